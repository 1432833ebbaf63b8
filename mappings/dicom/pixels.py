"""Pixel-level work for WADO-RS (runs in worker threads): transcoding between uncompressed transfer
syntaxes, frame extraction, rendering to JPEG/PNG with windowing and viewport, bulk data values."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.tag import Tag

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED = {EXPLICIT_LE, IMPLICIT_LE, BIG_ENDIAN}


class PixelError(ValueError):
    """kind: 'range' (no such frame/attribute → 404), 'unsupported' (→ 406), 'invalid' (→ 400)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def transcode(path: Path, target: str) -> bytes:
    """The instance re-encoded in another uncompressed transfer syntax (Part 10 file bytes)."""
    ds = dcmread(path)
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = target
    ds.save_as(buf, implicit_vr=target == IMPLICIT_LE, little_endian=target != BIG_ENDIAN, enforce_file_format=True)
    return buf.getvalue()


def frames(path: Path, numbers: list[int]) -> list[bytes]:
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise PixelError("range", "the instance has no pixel data")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    bad = [n for n in numbers if n > n_frames]
    if bad:
        raise PixelError("range", f"frame(s) {bad} beyond NumberOfFrames {n_frames}")
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts not in UNCOMPRESSED:
        encoded = list(generate_frames(ds.PixelData, number_of_frames=n_frames))
        return [encoded[n - 1] for n in numbers]
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
    data = ds.PixelData
    if bits == 1:
        per = rows * cols * spp
        bitarr = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return [np.packbits(bitarr[(n - 1) * per:n * per], bitorder="little").tobytes() for n in numbers]
    per = rows * cols * spp * bits // 8
    return [bytes(data[(n - 1) * per:n * per]) for n in numbers]


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    if function == "sigmoid":
        out = 255.0 / (1 + np.exp(-4 * (arr - center) / width))
    elif function == "linear_exact":
        out = (arr - (center - width / 2)) / width * 255.0
    else:  # PS3.3 C.11.2.1.2.1
        out = ((arr - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def render(path: Path, frame: int, fmt: str, opts: dict) -> bytes:
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise PixelError("range", "the instance has no pixel data")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if frame > n_frames:
        raise PixelError("range", f"frame {frame} beyond NumberOfFrames {n_frames}")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise PixelError("unsupported", f"cannot decode pixel data: {exc}") from None
    if n_frames > 1:
        arr = arr[frame - 1]
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2")
    if arr.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        values = arr.astype(np.float64) * float(ds.get("RescaleSlope") or 1) + float(ds.get("RescaleIntercept") or 0)
        if "window" in opts:
            center, width, function = opts["window"]
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            wc, ww = ds.WindowCenter, ds.WindowWidth
            center = float(wc[0] if getattr(wc, "is_multi", False) else wc)
            width = float(ww[0] if getattr(ww, "is_multi", False) else ww)
            function = "linear"
        else:
            lo, hi = float(values.min()), float(values.max())
            center, width, function = (lo + hi) / 2, max(hi - lo, 1.0), "linear_exact"
        out = _window(values, center, max(width, 1.0), function)
        if photometric == "MONOCHROME1":
            out = 255 - out
        img = Image.fromarray(out, "L")
    if "viewport" in opts:
        vw, vh = opts["viewport"]  # scale to fit, keeping the aspect ratio (PS3.18 §8.3.5.1.3)
        scale = min(vw / img.width, vh / img.height)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if fmt == "image/png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=opts.get("quality", 90))
    return buf.getvalue()


def bulk_value(path: Path, tag_text: str) -> bytes:
    try:
        tag = Tag(int(tag_text, 16))
    except ValueError:
        raise PixelError("invalid", f"{tag_text!r} is not an 8-hex-digit tag") from None
    ds = dcmread(path)
    if tag not in ds:
        raise PixelError("range", f"attribute {tag_text} is not in the instance")
    value = ds[tag].value
    if not isinstance(value, (bytes, bytearray)):
        raise PixelError("range", f"attribute {tag_text} is not bulk data")
    return bytes(value)
