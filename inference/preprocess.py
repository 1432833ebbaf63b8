"""Pixel pre-processing per model card (pure numpy): HU rescale, windowing, resize, channel stacking."""

from __future__ import annotations

import numpy as np

from inference.cards import Preprocess


def to_hu(pixels: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear windowing to [0, 1]."""
    lo = center - 0.5 - (width - 1) / 2
    return np.clip((hu - lo) / max(width - 1, 1.0), 0.0, 1.0).astype(np.float32)


def resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a 2-D image to (H, W) (align-corners style)."""
    h, w = img.shape
    H, W = hw
    if (h, w) == (H, W):
        return img.astype(np.float32)
    ys = np.linspace(0, h - 1, H, dtype=np.float32)
    xs = np.linspace(0, w - 1, W, dtype=np.float32)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    a = img[y0][:, x0]
    b = img[y0][:, x1]
    c = img[y1][:, x0]
    d = img[y1][:, x1]
    return ((a * (1 - wx) + b * wx) * (1 - wy) + (c * (1 - wx) + d * wx) * wy).astype(np.float32)  # type: ignore[no-any-return]


def prepare(pixels: np.ndarray, p: Preprocess, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """One slice (H, W) of stored values → a (C, H', W') float32 model input."""
    x = to_hu(pixels, slope, intercept) if p.hu_rescale else pixels.astype(np.float32)
    if p.window_center is not None and p.window_width is not None:
        x = window(x, p.window_center, p.window_width)
    x = resize(x, p.resize)
    return np.repeat(x[None], p.channels, axis=0)


def prepare_series(slices: list[tuple[np.ndarray, float, float]], p: Preprocess) -> np.ndarray:
    """(pixels, slope, intercept) per slice → (N, C, H, W) float32."""
    return np.stack([prepare(px, p, s, i) for px, s, i in slices]).astype(np.float32)
