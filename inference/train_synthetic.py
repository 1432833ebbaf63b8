"""Train the shipped models on synthetic CT-like slices and write them into the model repository.

Slices: 64x64 HU images (air outside a soft-tissue "body" ellipse at ~40 HU with noise); half carry a bright
round "lesion" (+~150 HU).  The classifier learns lesion / no lesion, the segmenter the lesion mask.
``python -m inference.train_synthetic [--repo DIR] [--seed N]`` — well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from inference import preprocess
from inference.models import SliceClassifier, ToySegmenter
from inference.repository import DEFAULT_REPOSITORY, ModelConfig, TensorSpec, write_model

SIZE = 64
WC, WW = 40.0, 400.0  # soft-tissue window (the cards use the same)


def synth_slice(rng: np.random.Generator, lesion: bool, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, lesion mask) — both (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    body = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.46 * size)) ** 2 <= 1
    img = np.full((size, size), -1000.0, np.float32)
    img[body] = 40.0
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        r = rng.uniform(0.06, 0.14) * size
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask[m & body] = 1
        img[m & body] += rng.uniform(120, 200)
    return img, mask


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys, ms = [], [], []
    for i in range(n):
        lesion = bool(i % 2)
        img, mask = synth_slice(rng, lesion)
        xs.append(preprocess.window(img, WC, WW)[None])
        ys.append(int(lesion))
        ms.append(mask[None].astype(np.float32))
    return np.stack(xs), np.array(ys), np.stack(ms)


def train(repo: Path = DEFAULT_REPOSITORY, seed: int = 0, n: int = 384, epochs: int = 6) -> dict[str, float]:
    torch.manual_seed(seed)
    x, y, m = dataset(n, seed)
    xt, yt, mt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)
    clf, seg = SliceClassifier(), ToySegmenter()
    opt_c = torch.optim.Adam(clf.parameters(), 3e-3)
    opt_s = torch.optim.Adam(seg.parameters(), 1e-2)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 32):
            idx = perm[i : i + 32]
            opt_c.zero_grad()
            loss = torch.nn.functional.nll_loss(torch.log(clf(xt[idx]) + 1e-7), yt[idx])
            loss.backward()
            opt_c.step()
            opt_s.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy(seg(xt[idx]), mt[idx], weight=1 + 10 * mt[idx])
            loss.backward()
            opt_s.step()
    clf.eval()
    seg.eval()
    xv, yv, mv = dataset(128, seed + 1)
    with torch.no_grad():
        acc = float((clf(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean())
        pred = seg(torch.from_numpy(xv)).numpy() > 0.5
        inter = (pred & (mv > 0)).sum()
        dice = float(2 * inter / max(pred.sum() + (mv > 0).sum(), 1))
    ex = torch.zeros(1, 1, SIZE, SIZE)
    write_model(
        repo,
        ModelConfig(
            "ct_lesion_classifier",
            (TensorSpec("INPUT__0", "TYPE_FP32", (1, SIZE, SIZE)),),
            (TensorSpec("OUTPUT__0", "TYPE_FP32", (2,)),),
        ),
        torch.jit.trace(clf, ex),
    )
    write_model(
        repo,
        ModelConfig(
            "ct_lesion_segmenter",
            (TensorSpec("INPUT__0", "TYPE_FP32", (1, SIZE, SIZE)),),
            (TensorSpec("OUTPUT__0", "TYPE_FP32", (1, SIZE, SIZE)),),
        ),
        torch.jit.trace(seg, ex),
    )
    return {"val_accuracy": acc, "val_dice": dice}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    metrics = train(a.repo, a.seed)
    print({**metrics, "seconds": round(time.perf_counter() - t, 1), "repo": str(a.repo)})


if __name__ == "__main__":
    main()
