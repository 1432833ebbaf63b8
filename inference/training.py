"""Federated training, the pure part: the architectures (torch modules), one site's local round
(evaluate the global weights on the held-out split, train, return the update), evaluation metrics
(AUROC, loss, Dice, per subgroup), pixel and mask loading, the held-out split and TorchScript export.
No I/O beyond reading the files it is given; the gateway's ``gateway.services.training`` drives it."""

from __future__ import annotations

import functools
import hashlib
import io
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

if TYPE_CHECKING:  # pragma: no cover
    from inference.cards import Preprocess

# ------------------------------------------------------------------------------------------------
# Architectures (a registry of torch modules)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    name: str
    task: str  # classification | segmentation
    card: str  # the shipped card this architecture's exported cards derive from
    output_dims: tuple[int, ...]  # Triton dims of OUTPUT__0 (without the batch dimension)


ARCHITECTURES = {
    "ct_lesion_classifier": Architecture("ct_lesion_classifier", "classification", "ct_lesion_classifier", (2,)),
    "ct_lesion_segmenter": Architecture("ct_lesion_segmenter", "segmentation", "ct_lesion_segmenter", (1, 64, 64)),
}


#: torch's global random generator (seeded by :func:`make_module`) and ``torch.jit.trace`` serve one thread at a
#: time: runs and sites call these from worker threads of one process.
_TORCH_LOCK = threading.RLock()


def make_module(arch: str, seed: int) -> Any:
    import torch

    from inference.models import REGISTRY

    with _TORCH_LOCK:
        torch.manual_seed(seed)
        return REGISTRY[arch]()


@functools.cache
def _shipped_card_bytes(arch: str) -> bytes:
    from inference.cards import SHIPPED_CARDS

    return (SHIPPED_CARDS / f"{ARCHITECTURES[arch].card}.json").read_bytes()


def shipped_card(arch: str) -> dict[Any, Any]:
    """The shipped card this architecture's exported cards derive from (read once; a fresh dict per call)."""
    card: dict[str, Any] = orjson.loads(_shipped_card_bytes(arch))
    return card


@functools.cache
def preprocess_of(arch: str) -> Preprocess:
    """The architecture's :class:`~inference.cards.Preprocess` (from its shipped card: training sees the
    pixels exactly as inference will)."""
    from inference.cards import parse_card

    return parse_card(shipped_card(arch)).preprocess


@dataclass(frozen=True)
class Optimiser:
    name: str = "adam"
    lr: float = 3e-3
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 0.0

    def json(self) -> dict[Any, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
        }


# ------------------------------------------------------------------------------------------------
# Local training (runs in a worker thread)
# ------------------------------------------------------------------------------------------------


def _device(pref: str) -> str:
    import torch

    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def evaluate(
    module: Any, x: np.ndarray, y: np.ndarray, groups: dict[str, list[str]], min_cell: int, device: str = "cpu"
) -> dict[Any, Any]:
    """Held-out loss (NLL) and AUROC overall and per subgroup; subgroups under ``min_cell`` are suppressed."""
    import torch

    from inference.monitoring import auroc

    if len(x) == 0:
        return {"n": 0, "loss": None, "auroc": None, "subgroups": {}}
    module.eval()
    with torch.inference_mode():
        probs = torch.cat([module(torch.from_numpy(x[i : i + 256]).to(device)).cpu() for i in range(0, len(x), 256)])
    yt = torch.from_numpy(y.astype(np.int64))
    loss = float(torch.nn.functional.nll_loss(torch.log(probs + 1e-7), yt))
    score = probs[:, 1].numpy().astype(float).tolist()
    labels = [bool(v) for v in y]
    out: dict[str, Any] = {
        "n": int(len(x)),
        "loss": round(loss, 5),
        "auroc": _r(auroc(labels, score)),
        "accuracy": round(float((probs.argmax(1) == yt).float().mean()), 4),
        "subgroups": {},
    }
    for name, values in groups.items():
        cells: dict[str, Any] = {}
        for g in sorted(set(values)):
            idx = [i for i, v in enumerate(values) if v == g]
            if len(idx) < min_cell:
                cells[g] = {"n": None, "auroc": None, "suppressed": True}
                continue
            cells[g] = {"n": len(idx), "auroc": _r(auroc([labels[i] for i in idx], [score[i] for i in idx]))}
        out["subgroups"][name] = cells
    return out


def _dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    denom = int(pred.sum()) + int(truth.sum())
    return None if denom == 0 else round(2.0 * int((pred & truth).sum()) / denom, 4)


def evaluate_seg(
    module: Any,
    x: np.ndarray,
    masks: np.ndarray,
    groups: dict[str, list[str]],
    min_cell: int,
    device: str = "cpu",
    threshold: float = 0.5,
) -> dict[Any, Any]:
    """Held-out weighted BCE and Dice (pixels pooled) overall and per subgroup (< ``min_cell`` slices suppressed)."""
    import torch

    if len(x) == 0:
        return {"n": 0, "loss": None, "dice": None, "subgroups": {}}
    module.eval()
    with torch.inference_mode():
        probs = torch.cat([module(torch.from_numpy(x[i : i + 256]).to(device)).cpu() for i in range(0, len(x), 256)])
    m = torch.from_numpy(masks)
    loss = float(torch.nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), m, weight=1 + 10 * m))
    pred = probs.numpy() >= threshold
    truth = masks > 0.5
    out: dict[str, Any] = {
        "n": int(len(x)),
        "loss": round(loss, 5),
        "dice": _dice(pred, truth),
        "lesion_slices": int(truth.reshape(len(x), -1).any(1).sum()),
        "subgroups": {},
    }
    for name, values in groups.items():
        cells: dict[str, Any] = {}
        for g in sorted(set(values)):
            idx = [i for i, v in enumerate(values) if v == g]
            cells[g] = (
                {"n": None, "dice": None, "suppressed": True}
                if len(idx) < min_cell
                else {"n": len(idx), "dice": _dice(pred[idx], truth[idx])}
            )
        out["subgroups"][name] = cells
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def local_round(
    arch: str,
    weights: bytes,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    groups: dict[str, list[str]],
    opt: Optimiser,
    epochs: int,
    seed: int,
    device_pref: str,
    do_train: bool,
    min_cell: int,
) -> dict[Any, Any]:
    """Evaluate the global weights on the held-out split, then train ``epochs`` epochs; return the update.
    Classification: targets are class indices (NLL of the softmax output); segmentation: targets are
    (N, 1, H, W) masks (binary cross-entropy with lesion pixels weighted 11×, plus a soft Dice term)."""
    import torch

    from inference import fl

    device = _device(device_pref)
    module = make_module(arch, seed)
    global_state = fl.decode_state(weights)
    fl.load_state(module, global_state)
    module.to(device)
    seg = ARCHITECTURES[arch].task == "segmentation"
    t_eval = time.perf_counter()
    metrics = (evaluate_seg if seg else evaluate)(module, *test, groups, min_cell, device)
    out: dict[str, Any] = {
        "metrics": metrics,
        "train_s": 0.0,
        "cpu_s": 0.0,
        "gpu_s": 0.0,
        "device": device,
        "eval_s": time.perf_counter() - t_eval,
    }
    if not do_train:
        return out
    xtr, ytr = train
    cpu0, t0 = time.process_time(), time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.float32 if seg else np.int64))
    if opt.name == "sgd":
        optim: torch.optim.Optimizer = torch.optim.SGD(
            module.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    else:
        optim = torch.optim.Adam(module.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    module.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), opt.batch_size):
            idx = perm[i : i + opt.batch_size]
            optim.zero_grad()
            out_t, target = module(xt[idx].to(device)), yt[idx].to(device)
            if seg:  # weighted BCE + soft Dice (lesions are ~1 % of the pixels)
                inter = (out_t * target).sum()
                loss = (
                    torch.nn.functional.binary_cross_entropy(
                        out_t.clamp(1e-7, 1 - 1e-7), target, weight=1 + 10 * target
                    )
                    + 1
                    - (2 * inter + 1) / (out_t.sum() + target.sum() + 1)
                )
            else:
                loss = torch.nn.functional.nll_loss(torch.log(out_t + 1e-7), target)
            loss.backward()
            optim.step()
            losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    last_epoch = losses[-max(1, len(losses) // epochs) :]
    out.update(
        train_s=wall,
        cpu_s=time.process_time() - cpu0,
        gpu_s=wall if device == "cuda" else 0.0,
        train_loss=round(sum(last_epoch) / len(last_epoch), 5) if losses else None,
    )
    module.to("cpu")
    out["update"] = fl.sub(fl.state_from_module(module), global_state)
    return out


def load_slices(paths: list[str], p: Preprocess) -> list[np.ndarray]:
    """Read stored instances (first frame) and preprocess them exactly as inference does
    (``inference.preprocess.prepare`` with the architecture card's :class:`~inference.cards.Preprocess`)."""
    from pydicom import dcmread

    from inference import preprocess

    out = []
    for path in paths:
        ds = dcmread(path)
        px = ds.pixel_array
        if px.ndim == 3:
            px = px[0]
        out.append(
            preprocess.prepare(
                px, p, float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
            )
        )
    return out


def load_seg_masks(items: list[tuple[str, int]], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """(SEG file, segment number) → {referenced source SOP Instance UID: (1, H, W) float32 mask} (highdicom;
    masks of several SEGs over the same image are combined)."""
    import highdicom as hd

    out: dict[str, np.ndarray] = {}
    for path, number in items:
        seg = hd.seg.segread(path)
        uids = [sop for _, _, sop in seg.get_source_image_uids()]
        if not uids:
            continue
        px = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number], assert_missing_frames_are_empty=True
        )
        for uid, m in zip(uids, px[..., 0]):
            h, w = m.shape
            yi, xi = np.arange(size[0]) * h // size[0], np.arange(size[1]) * w // size[1]
            mask = (m[yi][:, xi] > 0).astype(np.float32)[None]
            out[uid] = np.maximum(out[uid], mask) if uid in out else mask
    return out


def split_is_test(seed: int, patient_id: str, fraction: float) -> bool:
    """Whether the patient is held out: SHA-256(seed, patient) < fraction.  Keyed by the run's seed (not
    its id) so runs with the same seed evaluate on the same patients (a federated run and its local-only
    baselines compare like with like) and a run is reproducible from its specification."""
    h = hashlib.sha256(f"seed:{seed}|{patient_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def pooled_metrics(per_site: dict[str, dict[Any, Any]]) -> dict[Any, Any]:
    """Sample-weighted mean of the sites' held-out loss and AUROC (a summary; AUROC is not additive)."""
    n = sum(m.get("n") or 0 for m in per_site.values())
    if not n:
        return {"n": 0}
    out = {"n": n}
    for k in ("loss", "auroc", "accuracy", "dice"):
        vals = [(m.get(k), m.get("n") or 0) for m in per_site.values() if m.get(k) is not None]
        w = sum(c for _, c in vals)
        out[k] = round(sum(v * c for v, c in vals) / w, 4) if w else None  # type: ignore[misc, operator]
    return out


def torchscript(arch: str, state: Any) -> bytes:
    import torch

    from inference import fl

    buf = io.BytesIO()
    with _TORCH_LOCK:  # tracing in two threads at once fails its sanity check ("graphs differed")
        module = make_module(arch, 0)
        fl.load_state(module, state)
        module.eval()
        torch.jit.save(torch.jit.trace(module, torch.zeros(1, 1, 64, 64)), buf)
    return buf.getvalue()
