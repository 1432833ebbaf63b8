"""Federated training (docs/training.md): FedAvg across sites, consent re-selected every round.

The hub (``TrainingHub``) keeps the global weights and the run's lineage; it never sees an image or a
patient id.  Every round it sends the global weights to each site (``POST /federation/train/round``,
authenticated with the same short-lived ES256 hub → site tokens as federated queries, signed over the
exact body).  Each site (``SiteTrainer``) then

1. re-selects its local cohort **through its own consent gate** for the analyst's stated purpose (a
   withdrawal since the last round takes effect here), applies its site policy (may veto the purpose or
   the architecture) and refuses when the cohort is below the minimum size;
2. labels each patient with the run's label criterion (the federation cohort language: a FHIR Condition
   code, an SR finding, a SEG segment, ...), splits patients into train / held-out by a hash of
   (run id, patient id) — stable across rounds —, records the manifest (patient ids, instance UIDs) in
   its own ``trn_site_round`` table and returns only its SHA-256;
3. evaluates the received global weights on its held-out split (loss, AUROC overall and per sex, age
   band and manufacturer; subgroups below the disclosure threshold are suppressed) and trains
   ``epochs`` local epochs with torch in a worker thread (GPU when present);
4. returns the weight update (optionally clipped for differential privacy, optionally masked for secure
   aggregation), sample counts, metrics, local time and an energy estimate.

The hub aggregates with FedAvg weighted by sample counts (``inference.fl``), tolerates sites that drop
out as long as ``min_sites`` answered (quorum), and after the last round asks the sites for a final
held-out evaluation, exports the model in Triton's repository layout (TorchScript + config.pbtxt) and
stores every version for deployment and roll-back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import datetime as _dt
import hashlib
import io
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import aiohttp
import numpy as np
import orjson
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from gateway.context import Purpose, Requester
from gateway.errors import (BadRequest, Conflict, Forbidden, GatewayError, NotFound, ServiceUnavailable,
                            Unprocessable)
from gateway.services.access import AccessRecord
from gateway.services.federation import FederationConfig, SiteService, _detail, age_band, age_on, sign_hub_token
from gateway.settings import Settings, SettingsError
from gateway.store.access import where as gated_where
from gateway.store.blobs import BlobStore
from gateway.store.db import xact_lock
from gateway.store.dicom_schema import dcm_instance, dcm_series
from gateway.store.schema import cm_patient
from gateway.store.training_schema import trn_model, trn_round, trn_run, trn_site_round

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ANALYST_ROLES = ("analyst", "admin")
ID_CHUNK = 5000
#: Pixel cache per site (preprocessed 64×64 slices ≈ 16 KB each): rounds after the first read no files.
PIXEL_CACHE_MAX = 50_000
SUBGROUPS = ("sex", "age_band", "manufacturer")
#: Class key of the advisory lock that numbers a model's versions (PostgreSQL, several server processes).
MODEL_LOCK_CLASS = 0x464D4F44

#: Seconds between checks of a running training run's row for a cancellation made through another process.
CANCEL_POLL_S = 0.5


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingConfig:
    """``[training]`` settings (site and hub)."""

    enabled: bool = True  # site: accepts training rounds at all
    allowed_purposes: tuple[str, ...] = ()  # site policy: DUO purposes it trains for (empty = any research)
    allowed_architectures: tuple[str, ...] = ()  # site policy (empty = every registered architecture)
    min_cohort: int = 10  # site's own floor for the local cohort (max with the run's minimum)
    min_cell: int = 5  # subgroup metrics on fewer held-out patients are suppressed
    device: str = "auto"  # auto | cpu | cuda
    cpu_watts: float = 15.0  # energy = CPU s × cpu_watts + GPU s × gpu_watts
    gpu_watts: float = 300.0
    carbon_g_per_kwh: float = 350.0  # grid carbon intensity for the CO2e estimate
    repository: str = ""  # site: where deployed models go (default data_dir/model_repository)
    round_deadline_s: float = 900.0  # hub: per-site deadline of one round
    heartbeat_s: float = 15.0  # hub: a running run's row is touched this often; 4 missed → orphaned (failed)
    max_rounds: int = 1000
    key_file: str = ""  # site: X25519 key for secure aggregation (default data_dir/secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainingConfig":
        raw = settings.extra.get("training") or {}
        if not isinstance(raw, Mapping):
            raise SettingsError("setting 'training': expected a table")
        kw: dict[str, Any] = {}
        for f in ("enabled",):
            if f in raw:
                kw[f] = bool(raw[f])
        for f in ("allowed_purposes", "allowed_architectures"):
            if f in raw:
                v = raw[f]
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                    raise SettingsError(f"setting 'training.{f}': a list of strings")
                kw[f] = tuple(_curie(x) for x in v) if f == "allowed_purposes" else tuple(v)
        for f in ("min_cohort", "min_cell", "max_rounds"):
            if f in raw:
                kw[f] = int(raw[f])
        for f in ("cpu_watts", "gpu_watts", "carbon_g_per_kwh", "round_deadline_s", "heartbeat_s"):
            if f in raw:
                kw[f] = float(raw[f])
        for f in ("device", "repository", "key_file"):
            if raw.get(f):
                kw[f] = str(raw[f])
        cfg = cls(**kw)
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise SettingsError("setting 'training.device': auto, cpu or cuda")
        return cfg

    def repository_path(self, settings: Settings) -> Path:
        return Path(self.repository) if self.repository else settings.data_dir / "model_repository"


def _curie(code: str) -> str:
    prefix = "http://purl.obolibrary.org/obo/DUO_"
    return "DUO:" + code[len(prefix):] if code.startswith(prefix) else code


# ------------------------------------------------------------------------------------------------
# Architectures (a registry of torch modules) and the run specification
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


def make_module(arch: str, seed: int):
    import torch

    from inference.models import REGISTRY

    torch.manual_seed(seed)
    return REGISTRY[arch]()


@functools.lru_cache(maxsize=None)
def _shipped_card_bytes(arch: str) -> bytes:
    from inference.cards import SHIPPED_CARDS

    return (SHIPPED_CARDS / f"{ARCHITECTURES[arch].card}.json").read_bytes()


def shipped_card(arch: str) -> dict:
    """The shipped card this architecture's exported cards derive from (read once; a fresh dict per call)."""
    return orjson.loads(_shipped_card_bytes(arch))


@functools.lru_cache(maxsize=None)
def preprocess_of(arch: str):
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

    def json(self) -> dict:
        return {"name": self.name, "lr": self.lr, "batch_size": self.batch_size, "momentum": self.momentum,
                "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class RunSpec:
    architecture: str
    cohort: Any
    label: Any
    images: dict
    rounds: int
    local_epochs: int
    optimiser: Optimiser
    min_sites: int
    min_cohort: int
    sites: tuple[str, ...] | None
    seed: int
    test_fraction: float
    dp: dict | None  # {"clip", "noise_multiplier", "delta"}
    secure_aggregation: bool
    name: str

    def json(self) -> dict:
        return {"architecture": self.architecture, "cohort": self.cohort, "label": self.label,
                "images": self.images, "rounds": self.rounds, "local_epochs": self.local_epochs,
                "optimizer": self.optimiser.json(), "min_sites": self.min_sites, "min_cohort": self.min_cohort,
                "sites": list(self.sites) if self.sites is not None else None, "seed": self.seed,
                "test_fraction": self.test_fraction, "dp": self.dp, "secure_aggregation": self.secure_aggregation,
                "name": self.name}


def _num(doc: Mapping, key: str, kind, lo, hi, default):
    v = doc.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok or not lo <= v <= hi:
        raise BadRequest(f"{key}: expected {'an integer' if kind is int else 'a number'} in [{lo}, {hi}]",
                         expression=[f"$.{key}"])
    return kind(v)


def parse_optimiser(doc: Any) -> Optimiser:
    if doc is None:
        return Optimiser()
    if not isinstance(doc, dict):
        raise BadRequest("optimizer: expected an object {name, lr, batch_size, momentum, weight_decay}",
                         expression=["$.optimizer"])
    unknown = set(doc) - {"name", "lr", "batch_size", "momentum", "weight_decay"}
    if unknown:
        raise BadRequest(f"optimizer: unknown field {sorted(unknown)[0]!r}", expression=["$.optimizer"])
    name = doc.get("name", "adam")
    if name not in ("adam", "sgd"):
        raise BadRequest("optimizer.name: adam or sgd", expression=["$.optimizer.name"])
    return Optimiser(name, _num(doc, "lr", float, 1e-7, 10.0, 3e-3), _num(doc, "batch_size", int, 1, 4096, 16),
                     _num(doc, "momentum", float, 0.0, 1.0, 0.9), _num(doc, "weight_decay", float, 0.0, 1.0, 0.0))


def parse_spec(doc: Any, cfg: TrainingConfig, site_ids: tuple[str, ...]) -> RunSpec:
    from mappings.cohort import CohortError, parse

    if not isinstance(doc, dict):
        raise BadRequest("request body: a JSON object {architecture, cohort, label, rounds, ...}", expression=["$"])
    known = {"architecture", "cohort", "label", "images", "rounds", "local_epochs", "optimizer", "min_sites",
             "min_cohort", "sites", "seed", "test_fraction", "dp", "secure_aggregation", "name"}
    unknown = set(doc) - known
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}", expression=[f"$.{sorted(unknown)[0]}"])
    arch = doc.get("architecture")
    if arch not in ARCHITECTURES:
        raise BadRequest(f"architecture: one of {sorted(ARCHITECTURES)}", expression=["$.architecture"])
    for key in ("cohort", "label"):
        if key not in doc:
            raise BadRequest(f"{key}: required (a criterion of the federation cohort language)",
                             expression=[f"$.{key}"])
        try:
            node = parse(doc[key], f"$.{key}")
        except CohortError as exc:
            raise BadRequest(str(exc), expression=[exc.field]) from None
        if key == "label" and ARCHITECTURES[arch].task == "segmentation" and (
                node.kind != "seg" or len(node.body.segments) != 1):
            raise BadRequest("label: a segmentation architecture learns the masks of one SEG segment: "
                             '{"seg": {"segments": [{"label" | "type" | "category": ...}]}}', expression=["$.label"])
    images = doc.get("images") or {"modality": ["CT"]}
    if not isinstance(images, dict) or set(images) - {"modality"} or not isinstance(images.get("modality", []), list):
        raise BadRequest("images: {\"modality\": [codes]}", expression=["$.images"])
    sites = doc.get("sites")
    if sites is not None:
        if not isinstance(sites, list) or not sites or any(s not in site_ids for s in sites):
            raise BadRequest("sites: a non-empty list of configured site ids", expression=["$.sites"])
        sites = tuple(dict.fromkeys(sites))
    n_sites = len(sites) if sites is not None else len(site_ids)
    if n_sites == 0:
        raise Unprocessable("this hub has no sites configured (federation.sites)")
    min_sites = _num(doc, "min_sites", int, 1, max(n_sites, 1), min(2, n_sites))
    dp = doc.get("dp")
    if dp is not None:
        if not isinstance(dp, dict) or set(dp) - {"clip", "noise_multiplier", "delta"}:
            raise BadRequest("dp: {clip, noise_multiplier, delta}", expression=["$.dp"])
        dp = {"clip": _num(dp, "clip", float, 1e-6, 1e6, 1.0),
              "noise_multiplier": _num(dp, "noise_multiplier", float, 0.0, 100.0, 1.0),
              "delta": _num(dp, "delta", float, 1e-12, 0.1, 1e-5)}
    sec = doc.get("secure_aggregation", False)
    if not isinstance(sec, bool):
        raise BadRequest("secure_aggregation: true or false", expression=["$.secure_aggregation"])
    name = doc.get("name") or f"fl-{arch.replace('_', '-')}"
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(name) > 48:
        raise BadRequest("name: letters, digits, '-', '_', '.' (at most 48)", expression=["$.name"])
    return RunSpec(arch, doc["cohort"], doc["label"], {"modality": [str(m).upper() for m in images.get("modality", ["CT"])]},
                   _num(doc, "rounds", int, 1, cfg.max_rounds, 5), _num(doc, "local_epochs", int, 1, 100, 1),
                   parse_optimiser(doc.get("optimizer")), min_sites, _num(doc, "min_cohort", int, 1, 10**7, 10),
                   sites, _num(doc, "seed", int, 0, 2**31 - 1, 0), _num(doc, "test_fraction", float, 0.05, 0.9, 0.2),
                   dp, sec, name)


# ------------------------------------------------------------------------------------------------
# Local training (runs in a worker thread)
# ------------------------------------------------------------------------------------------------


def _device(pref: str) -> str:
    import torch

    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def evaluate(module, x: np.ndarray, y: np.ndarray, groups: dict[str, list[str]], min_cell: int,
             device: str = "cpu") -> dict:
    """Held-out loss (NLL) and AUROC overall and per subgroup; subgroups under ``min_cell`` are suppressed."""
    import torch

    from inference.monitoring import auroc

    if len(x) == 0:
        return {"n": 0, "loss": None, "auroc": None, "subgroups": {}}
    module.eval()
    with torch.inference_mode():
        probs = torch.cat([module(torch.from_numpy(x[i:i + 256]).to(device)).cpu() for i in range(0, len(x), 256)])
    yt = torch.from_numpy(y.astype(np.int64))
    loss = float(torch.nn.functional.nll_loss(torch.log(probs + 1e-7), yt))
    score = probs[:, 1].numpy().astype(float).tolist()
    labels = [bool(v) for v in y]
    out: dict[str, Any] = {"n": int(len(x)), "loss": round(loss, 5), "auroc": _r(auroc(labels, score)),
                           "accuracy": round(float((probs.argmax(1) == yt).float().mean()), 4), "subgroups": {}}
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


def evaluate_seg(module, x: np.ndarray, masks: np.ndarray, groups: dict[str, list[str]], min_cell: int,
                 device: str = "cpu", threshold: float = 0.5) -> dict:
    """Held-out weighted BCE and Dice (pixels pooled) overall and per subgroup (< ``min_cell`` slices suppressed)."""
    import torch

    if len(x) == 0:
        return {"n": 0, "loss": None, "dice": None, "subgroups": {}}
    module.eval()
    with torch.inference_mode():
        probs = torch.cat([module(torch.from_numpy(x[i:i + 256]).to(device)).cpu() for i in range(0, len(x), 256)])
    m = torch.from_numpy(masks)
    loss = float(torch.nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), m, weight=1 + 10 * m))
    pred = probs.numpy() >= threshold
    truth = masks > 0.5
    out: dict[str, Any] = {"n": int(len(x)), "loss": round(loss, 5), "dice": _dice(pred, truth),
                           "lesion_slices": int(truth.reshape(len(x), -1).any(1).sum()), "subgroups": {}}
    for name, values in groups.items():
        cells: dict[str, Any] = {}
        for g in sorted(set(values)):
            idx = [i for i, v in enumerate(values) if v == g]
            cells[g] = ({"n": None, "dice": None, "suppressed": True} if len(idx) < min_cell
                        else {"n": len(idx), "dice": _dice(pred[idx], truth[idx])})
        out["subgroups"][name] = cells
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def local_round(arch: str, weights: bytes, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                groups: dict[str, list[str]], opt: Optimiser, epochs: int, seed: int, device_pref: str,
                do_train: bool, min_cell: int) -> dict:
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
    out: dict[str, Any] = {"metrics": metrics, "train_s": 0.0, "cpu_s": 0.0, "gpu_s": 0.0, "device": device,
                           "eval_s": time.perf_counter() - t_eval}
    if not do_train:
        return out
    xtr, ytr = train
    cpu0, t0 = time.process_time(), time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.float32 if seg else np.int64))
    if opt.name == "sgd":
        optim = torch.optim.SGD(module.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        optim = torch.optim.Adam(module.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    module.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), opt.batch_size):
            idx = perm[i:i + opt.batch_size]
            optim.zero_grad()
            out_t, target = module(xt[idx].to(device)), yt[idx].to(device)
            if seg:  # weighted BCE + soft Dice (lesions are ~1 % of the pixels)
                inter = (out_t * target).sum()
                loss = (torch.nn.functional.binary_cross_entropy(out_t.clamp(1e-7, 1 - 1e-7), target, weight=1 + 10 * target)
                        + 1 - (2 * inter + 1) / (out_t.sum() + target.sum() + 1))
            else:
                loss = torch.nn.functional.nll_loss(torch.log(out_t + 1e-7), target)
            loss.backward()
            optim.step()
            losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    last_epoch = losses[-max(1, len(losses) // epochs):]
    out.update(train_s=wall, cpu_s=time.process_time() - cpu0, gpu_s=wall if device == "cuda" else 0.0,
               train_loss=round(sum(last_epoch) / len(last_epoch), 5) if losses else None)
    module.to("cpu")
    out["update"] = fl.sub(fl.state_from_module(module), global_state)
    return out


def load_slices(paths: list[str], p) -> list[np.ndarray]:
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
        out.append(preprocess.prepare(px, p, float(getattr(ds, "RescaleSlope", 1) or 1),
                                      float(getattr(ds, "RescaleIntercept", 0) or 0)))
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
        px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                               assert_missing_frames_are_empty=True)
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(s: Any, field_name: str) -> bytes:
    if not isinstance(s, str):
        raise BadRequest(f"{field_name}: base64 text expected", expression=[f"$.{field_name}"])
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise BadRequest(f"{field_name}: not valid base64", expression=[f"$.{field_name}"]) from None


def energy(cfg: TrainingConfig, cpu_s: float, gpu_s: float) -> tuple[float, float]:
    """(joules, grams CO2e) for ``cpu_s`` CPU seconds and ``gpu_s`` GPU seconds."""
    j = cpu_s * cfg.cpu_watts + gpu_s * cfg.gpu_watts
    return j, j / 3.6e6 * cfg.carbon_g_per_kwh


# ------------------------------------------------------------------------------------------------
# Site
# ------------------------------------------------------------------------------------------------


class SiteTrainer:
    """The site's side of a training round (see the module docstring)."""

    def __init__(self, settings: Settings, cfg: TrainingConfig, db, gate, audit, expand=None) -> None:
        self.settings, self.cfg, self.db, self.gate, self.audit, self.expand = settings, cfg, db, gate, audit, expand
        self._pixels: dict[str, np.ndarray] = {}
        self.blobs = BlobStore(settings.blob_dir)
        self._keys = None

    # secure aggregation key (X25519), created once per site
    def keys(self):
        from inference import fl

        if self._keys is None:
            path = Path(self.cfg.key_file) if self.cfg.key_file else self.settings.secrets_dir / "training-x25519.pem"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(fl.SiteKeys.generate().to_pem())
                tmp.chmod(0o600)
                try:  # create-if-absent: every server process of the site (processes > 1) ends up with one key
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink(missing_ok=True)
            self._keys = fl.SiteKeys.from_pem(path.read_bytes())
        return self._keys

    def check_policy(self, requester: Requester, arch: str) -> None:
        SiteService.check_requester(requester)
        if not self.cfg.enabled:
            raise Forbidden("site policy: this site does not take part in federated training")
        if self.cfg.allowed_purposes and not set(requester.purpose.codes) & set(self.cfg.allowed_purposes):
            raise Forbidden("site policy: federated training is not allowed for this purpose at this site")
        if self.cfg.allowed_architectures and arch not in self.cfg.allowed_architectures:
            raise Forbidden(f"site policy: architecture {arch} is not allowed at this site")

    async def round(self, requester: Requester, doc: Any, *, hub: str, path: str = "") -> dict:
        from inference import fl

        if not isinstance(doc, dict):
            raise BadRequest("request body: a JSON object", expression=["$"])
        run_id, rnd = doc.get("run_id"), doc.get("round")
        if not isinstance(run_id, str) or not 1 <= len(run_id) <= 64 or not isinstance(rnd, int) or rnd < 1:
            raise BadRequest("run_id (string) and round (integer ≥ 1) are required", expression=["$.run_id"])
        arch = doc.get("architecture")
        if arch not in ARCHITECTURES:
            raise BadRequest(f"architecture: one of {sorted(ARCHITECTURES)}", expression=["$.architecture"])
        try:
            self.check_policy(requester, arch)
        except Forbidden as exc:
            await self.audit.record(AccessRecord(requester, "E", "federated-training", "4", path=path,
                                                 detail=f"via={hub} run={run_id} round={rnd} refused: {exc.message}"))
            raise
        spec = parse_spec({k: doc[k] for k in ("architecture", "cohort", "label", "images", "optimizer", "seed",
                                                "test_fraction", "min_cohort") if k in doc}
                          | {"min_sites": 1, "local_epochs": doc.get("local_epochs", 1)}, self.cfg, ("self",))
        weights = _unb64(doc.get("weights"), "weights")
        try:
            received = fl.decode_state(weights)
            fl.check_compatible(received, fl.state_from_module(make_module(arch, 0)), f"weights vs {arch}")
            fl.check_finite(received, "weights")
        except ValueError as exc:
            raise BadRequest(f"weights: {exc}", expression=["$.weights"]) from None
        do_train = doc.get("train", True)
        if not isinstance(do_train, bool):
            raise BadRequest("train: true or false", expression=["$.train"])
        dp_clip = doc.get("dp_clip")
        if dp_clip is not None and (not isinstance(dp_clip, (int, float)) or isinstance(dp_clip, bool) or dp_clip <= 0):
            raise BadRequest("dp_clip: a positive number", expression=["$.dp_clip"])
        secure = doc.get("secure")
        me = self.settings.site_id
        if secure is not None:
            parts = secure.get("participants") if isinstance(secure, dict) else None
            if not isinstance(parts, dict) or me not in parts or not all(isinstance(v, str) for v in parts.values()):
                raise BadRequest("secure.participants: {site id: X25519 public key}, including this site",
                                 expression=["$.secure.participants"])
            try:  # refuse unusable keys before any work
                for pid, pub in parts.items():
                    if pid != me:
                        self.keys().shared(pub)
            except ValueError as exc:
                raise BadRequest(f"secure.participants: {exc}", expression=["$.secure.participants"]) from None

        t_site = time.perf_counter()
        scope = await self.gate.scope_for(requester)
        data = await self._select(spec, scope)
        n_patients = len({p for p, *_ in data["rows"]})
        floor = max(spec.min_cohort, self.cfg.min_cohort)
        if n_patients < floor:
            await self.audit.record(AccessRecord(requester, "E", "federated-training", "4", path=path,
                                                 scope_summary=scope.summary,
                                                 detail=f"via={hub} run={run_id} round={rnd} refused: cohort below minimum"))
            raise Unprocessable(f"local cohort below the minimum size ({floor} patients) for this purpose")
        manifest = {"train": sorted([p, s] for p, s, t, *_ in data["rows"] if not t),
                    "test": sorted([p, s] for p, s, t, *_ in data["rows"] if t)}
        manifest_hash = hashlib.sha256(orjson.dumps(manifest)).hexdigest()
        consent_hash = hashlib.sha256(orjson.dumps({"scope": sorted(scope.allowed_profiles) if not scope.unrestricted
                                                    else "unrestricted", "patients": data["consent"]})).hexdigest()
        await self._record_manifest(run_id, rnd, hub, requester.purpose, manifest, manifest_hash, consent_hash)

        x, y, groups, is_test = await self._arrays(arch, data["rows"],
                                                   data["segs"] if ARCHITECTURES[arch].task == "segmentation" else None)
        tr = (x[~is_test], y[~is_test])
        te = (x[is_test], y[is_test])
        te_groups = {g: [v for v, t in zip(vals, is_test) if t] for g, vals in groups.items()}
        res = await asyncio.to_thread(local_round, arch, weights, tr, te, te_groups, spec.optimiser, spec.local_epochs,
                                      spec.seed * 1000 + rnd, self.cfg.device, do_train, self.cfg.min_cell)
        j, co2 = energy(self.cfg, res["cpu_s"], res["gpu_s"])
        out: dict[str, Any] = {"site": me, "run_id": run_id, "round": rnd, "status": "ok",
                               "n_train": int(len(tr[0])), "n_test": int(len(te[0])),
                               "patients_train": len({r[0] for r in manifest["train"]}),
                               "metrics": res["metrics"], "train_loss": res.get("train_loss"),
                               "consent_hash": consent_hash, "manifest_hash": manifest_hash,
                               "train_s": round(res["train_s"], 4), "eval_s": round(res["eval_s"], 4),
                               "site_s": round(time.perf_counter() - t_site, 4), "cpu_s": round(res["cpu_s"], 4),
                               "gpu_s": round(res["gpu_s"], 4), "device": res["device"],
                               "energy_j": round(j, 3), "co2e_g": round(co2, 6)}
        if do_train:
            upd = res["update"]
            out["update_norm"] = round(fl.l2_norm(upd), 6)
            if dp_clip is not None:
                upd, _ = fl.clip(upd, float(dp_clip))
            if secure is not None:
                # weighted by the sample count unless DP is on (DP-FedAvg averages clipped updates equally)
                weight = 1.0 if dp_clip is not None else float(len(tr[0]))
                masked = fl.masked_update(upd, weight, me, self.keys(), secure["participants"], run_id, rnd)
                out["update"] = _b64(fl.encode_state(masked))
                out["update_kind"] = "masked"
                out["weight"] = weight
            else:
                out["update"] = _b64(fl.encode_state(upd))
                out["update_kind"] = "delta"
        await self.audit.record(AccessRecord(
            requester, "E", "federated-training", "0", patients=tuple(sorted({r[0] for r in data["rows"]}))[:200],
            scope_summary=scope.summary, path=path,
            detail=f"via={hub} run={run_id} round={rnd} train={do_train} n_train={out['n_train']} n_test={out['n_test']}",
            extra={"manifest_hash": manifest_hash[:16]}))
        return out

    async def _select(self, spec: RunSpec, scope) -> dict:
        """Cohort ∩ consent scope → (patient, sop, is_test, label, blob, sex, age band, manufacturer) rows."""
        from gateway.store.cohort import compile_cohort
        from mappings.cohort import parse

        today = _dt.date.today()
        cohort_q = compile_cohort(parse(spec.cohort, "$.cohort"), scope, expand=self.expand, today=today)
        label_q = compile_cohort(parse(spec.label, "$.label"), scope, expand=self.expand, today=today)
        async with self.db.read() as conn:
            members = sorted({r[0] for r in (await conn.execute(cohort_q)).all() if r[0]})
            positive = {r[0] for r in (await conn.execute(label_q)).all()}
            rows, consent = [], []
            for i in range(0, len(members), ID_CHUNK):
                ids = members[i:i + ID_CHUNK]
                q = (select(dcm_instance.c.patient_id, dcm_instance.c.sop_uid, dcm_instance.c.blob_path,
                            dcm_series.c.manufacturer, cm_patient.c.sex, cm_patient.c.birth_date,
                            cm_patient.c.consent_profile)
                     .join(dcm_series, dcm_series.c.series_uid == dcm_instance.c.series_uid)
                     .join(cm_patient, cm_patient.c.patient_id == dcm_instance.c.patient_id)
                     # through the access layer's predicates: each instance by its own patient link
                     .where(dcm_instance.c.patient_id.in_(ids), gated_where(scope, dcm_instance),
                            gated_where(scope, cm_patient), dcm_instance.c.rows.is_not(None))
                     # a reproducible sample order (UIDs are random): patient, series, instance number
                     .order_by(dcm_instance.c.patient_id, dcm_series.c.series_number, dcm_instance.c.instance_number,
                               dcm_instance.c.sop_uid))
                if spec.images.get("modality"):
                    q = q.where(func.upper(dcm_series.c.modality).in_(spec.images["modality"]))
                seen = set()
                for r in (await conn.execute(q)).all():
                    if r.sop_uid in seen:
                        continue
                    seen.add(r.sop_uid)
                    rows.append((r.patient_id, r.sop_uid, split_is_test(spec.seed, r.patient_id, spec.test_fraction),
                                 int(r.patient_id in positive), r.blob_path, r.sex or "unknown",
                                 age_band(age_on(r.birth_date, today)) or "unknown",
                                 (r.manufacturer or "unknown").strip()))
                    consent.append((r.patient_id, r.consent_profile))
            segs = await self._seg_items(conn, spec, scope, members) if ARCHITECTURES[spec.architecture].task == "segmentation" else []
        return {"rows": rows, "consent": sorted(set(consent)), "segs": segs}

    @staticmethod
    async def _seg_items(conn, spec: RunSpec, scope, members: list[str]) -> list[tuple[str, int]]:
        """(SEG blob path, segment number) of the label's segment in the cohort's SEG instances."""
        from gateway.store.dicom_schema import dcm_seg_segment as t
        from mappings.cohort import parse
        from gateway.store.cohort import Compiler

        want = parse(spec.label, "$.label").body.segments[0]
        out = []
        for i in range(0, len(members), ID_CHUNK):
            q = (select(dcm_instance.c.blob_path, t.c.segment_number)
                 .join(dcm_instance, dcm_instance.c.sop_uid == t.c.sop_uid)
                 .where(t.c.patient_id.in_(members[i:i + ID_CHUNK]),
                        scope.patient_clause(t.c.patient_id, allow_no_patient=False), *Compiler._segment_conds(t, want))
                 .order_by(t.c.sop_uid, t.c.segment_number))
            out += [(r[0], int(r[1])) for r in (await conn.execute(q)).all()]
        return out

    async def _arrays(self, arch: str, rows: list[tuple], segs: list[tuple[str, int]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]], np.ndarray]:
        """Model inputs, targets (class index, or a (1, H, W) mask per image when ``segs`` is given: the
        label segment's pixels from those SEG instances, empty for images no SEG covers), subgroups, split."""
        pre = preprocess_of(arch)
        missing = [(sop, blob) for _, sop, _, _, blob, *_ in rows if sop not in self._pixels]
        if missing:
            loaded = await asyncio.to_thread(load_slices, [str(self.blobs.path(b)) for _, b in missing], pre)
            if len(self._pixels) + len(loaded) > PIXEL_CACHE_MAX:
                self._pixels.clear()
            for (sop, _), arr in zip(missing, loaded):
                self._pixels[sop] = arr
        if not rows:
            return np.zeros((0, 1, 64, 64), np.float32), np.zeros(0, np.int64), {g: [] for g in SUBGROUPS}, np.zeros(0, bool)
        x = np.stack([self._pixels[r[1]] for r in rows]).astype(np.float32)
        if segs is not None:
            masks = await asyncio.to_thread(load_seg_masks, [(str(self.blobs.path(b)), n) for b, n in segs],
                                            pre.resize)
            empty = np.zeros((1, *x.shape[2:]), np.float32)
            y = np.stack([masks.get(r[1], empty) for r in rows]).astype(np.float32)
        else:
            y = np.array([r[3] for r in rows], np.int64)
        groups = {"sex": [r[5] for r in rows], "age_band": [r[6] for r in rows], "manufacturer": [r[7] for r in rows]}
        return x, y, groups, np.array([r[2] for r in rows], bool)

    async def _record_manifest(self, run_id, rnd, hub, purpose: Purpose, manifest, manifest_hash, consent_hash) -> None:
        values = dict(hub_id=hub[:64], started_ts=time.time(), purpose=purpose.describe(),
                      manifest=orjson.dumps(manifest).decode(), manifest_hash=manifest_hash, consent_hash=consent_hash,
                      n_train=len(manifest["train"]), n_test=len(manifest["test"]))
        async with self.db.write() as conn:
            n = (await conn.execute(update(trn_site_round).where(
                trn_site_round.c.run_id == run_id, trn_site_round.c.round == rnd).values(**values))).rowcount
            if not n:
                await conn.execute(trn_site_round.insert().values(run_id=run_id, round=rnd, **values))

    async def manifests(self, requester: Requester, run_id: str) -> list[dict]:
        if not requester.is_admin:
            raise Forbidden("the site's training manifests need the site admin role")
        scope = await self.gate.scope_for(requester)  # the manifests name patients and instances
        async with self.db.read() as conn:
            rows = (await conn.execute(select(trn_site_round).where(trn_site_round.c.run_id == run_id)
                                       .order_by(trn_site_round.c.round))).mappings().all()
            visible = None
            if rows and not scope.unrestricted:  # a research scope sees its permitted patients' entries only
                visible = set((await conn.execute(select(cm_patient.c.patient_id).where(
                    gated_where(scope, cm_patient), cm_patient.c.patient_id.is_not(None)))).scalars())
        if not rows:
            raise NotFound(f"no training rounds of run {run_id} at this site")
        out = []
        for r in rows:
            manifest = orjson.loads(r["manifest"])
            if visible is not None:
                manifest = {k: [e for e in v if e and e[0] in visible] if isinstance(v, list) else v
                            for k, v in manifest.items()}
            out.append({**{str(k): v for k, v in r.items() if k != "manifest"}, "manifest": manifest})
        await self.audit.record(AccessRecord(requester, "R", "training-manifest", "0", scope_summary=scope.summary,
                                             detail=f"run={run_id}"))
        return out

    async def deploy(self, requester: Requester, doc: Any, inference, *, hub: str, path: str = "") -> dict:
        """Install a model version from the hub into this site's model repository and activate it
        (it becomes the default version of its card; older versions stay registered for roll-back)."""
        from inference.cards import CardError, parse_card
        from inference.repository import ModelConfig, TensorSpec

        if not requester.is_admin:
            raise Forbidden("deploying a model needs the admin role")
        if not isinstance(doc, dict) or not isinstance(doc.get("card"), dict):
            raise BadRequest("request body: {card, model (base64 TorchScript)}", expression=["$.card"])
        try:
            card = parse_card(doc["card"])
        except CardError as e:
            raise Unprocessable(f"model card: {e}") from None
        model = _unb64(doc.get("model"), "model") if doc.get("model") is not None else None
        if inference is None:
            raise Unprocessable("this site has no inference service")
        repo = self.cfg.repository_path(self.settings)
        target = repo / card.triton_model / card.triton_version / "model.pt"
        if model is not None:
            if not model.startswith(b"PK"):
                raise BadRequest("model: not a TorchScript archive", expression=["$.model"])
            if target.exists() and target.read_bytes() != model:
                raise Conflict(f"model {card.triton_model} version {card.triton_version} exists with other weights")
            if not target.exists():
                arch = doc.get("architecture") if doc.get("architecture") in ARCHITECTURES else (
                    "ct_lesion_segmenter" if any(o.kind == "segmentation" for o in card.outputs) else "ct_lesion_classifier")
                cfg = ModelConfig(card.triton_model, (TensorSpec("INPUT__0", "TYPE_FP32", (1, 64, 64)),),
                                  (TensorSpec("OUTPUT__0", "TYPE_FP32", ARCHITECTURES[arch].output_dims),))
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(model)
                tmp.replace(target)
                (repo / card.triton_model / "config.pbtxt").write_text(cfg.pbtxt())
        elif not target.exists():
            raise NotFound(f"model {card.triton_model} version {card.triton_version} is not installed at this site")
        backend = inference.backend  # serves `repo` already (added at start-up, gateway/handlers/training.py)
        from inference.backends import BackendError, BackendUnavailable

        try:
            await backend.load(card.triton_model, card.triton_version)
        except (BackendError, BackendUnavailable):
            pass  # e.g. Triton in poll mode refuses explicit loads: it picks the new version up itself
        for _ in range(120):
            if await backend.ready(card.triton_model, card.triton_version):
                break
            await asyncio.sleep(0.5)
        else:
            raise ServiceUnavailable(f"the inference backend did not make {card.triton_model} version "
                                     f"{card.triton_version} ready within 60 s (training.repository must be a "
                                     f"repository it serves)")
        from gateway.store.jobs_schema import inf_model_card

        view, created = await inference.register(requester, doc["card"], system=True)
        async with self.db.write() as conn:  # activation: the default version is the most recently activated
            await conn.execute(update(inf_model_card).where(inf_model_card.c.name == card.name,
                                                            inf_model_card.c.version == card.version)
                               .values(registered_ts=time.time(), enabled=1))
        await self.audit.record(AccessRecord(requester, "U", "model-deploy", "0", path=path,
                                             detail=f"via={hub} model {card.key}"))
        return {"site": self.settings.site_id, "model": card.name, "version": card.version, "installed": True,
                "registered": created, "active": True}


# ------------------------------------------------------------------------------------------------
# Hub
# ------------------------------------------------------------------------------------------------


def _requester_doc(r: Requester) -> dict:
    return {"subject": r.subject, "roles": sorted(r.roles), "organization": r.organization,
            "attributes": dict(r.attributes), "purpose": {"kind": r.purpose.kind, "codes": list(r.purpose.codes),
                                                          "diseases": list(r.purpose.diseases)}}


class TrainingHub:
    def __init__(self, settings: Settings, cfg: TrainingConfig, fcfg: FederationConfig, db, session: aiohttp.ClientSession,
                 key, audit) -> None:
        self.settings, self.cfg, self.fcfg, self.db, self.session, self.key, self.audit = \
            settings, cfg, fcfg, db, session, key, audit
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: set[str] = set()

    # ------------------------------------------------------------------------------------ API
    async def start(self, requester: Requester, doc: Any) -> dict:
        SiteService.check_requester(requester)
        spec = parse_spec(doc, self.cfg, tuple(s.id for s in self.fcfg.sites))
        run_id = uuid.uuid4().hex
        now = time.time()
        async with self.db.write() as conn:
            await conn.execute(trn_run.insert().values(
                run_id=run_id, spec=orjson.dumps(spec.json()).decode(), state="queued", round=0,
                requester=orjson.dumps(_requester_doc(requester)).decode(), created_ts=now, updated_ts=now))
        await self.audit.record(AccessRecord(requester, "C", "training-run", "0", detail=f"run={run_id} "
                                             f"architecture={spec.architecture} rounds={spec.rounds}"))
        self._tasks[run_id] = asyncio.create_task(self._run(run_id, spec, requester))
        return await self.get(requester, run_id)

    async def _row(self, conn, run_id: str):
        row = (await conn.execute(select(trn_run).where(trn_run.c.run_id == run_id))).first()
        if row is None:
            raise NotFound(f"training run {run_id} not found")
        return row

    @staticmethod
    def _may_see(requester: Requester, row) -> bool:
        return requester.is_admin or orjson.loads(row.requester)["subject"] == requester.subject

    def _orphaned(self, row) -> bool:
        """Queued/running, no task of this process runs it, and no heartbeat for 4 × ``heartbeat_s``."""
        return (row.state in ("queued", "running") and row.run_id not in self._tasks
                and row.updated_ts < time.time() - 4 * self.cfg.heartbeat_s)

    async def reap_orphans(self) -> None:
        """Mark orphaned runs failed: the hub process running them died (SIGKILL, power loss) without
        :meth:`close`.  Runs of a live process — this one or another on the same store — keep their
        heartbeat fresh and are left alone.  Called at start-up and whenever a read sees an orphan."""
        cutoff = time.time() - 4 * self.cfg.heartbeat_s
        q = update(trn_run).where(trn_run.c.state.in_(("queued", "running")), trn_run.c.updated_ts < cutoff)
        if self._tasks:
            q = q.where(trn_run.c.run_id.not_in(list(self._tasks)))
        async with self.db.write() as conn:
            res = await conn.execute(q.values(state="failed", updated_ts=time.time(),
                                              error="the hub process running it stopped (no heartbeat)"))
        if res.rowcount:
            log.warning("training runs orphaned by a stopped hub process marked failed", extra={"runs": res.rowcount})

    async def get(self, requester: Requester, run_id: str) -> dict:
        for attempt in (1, 2):
            async with self.db.read() as conn:
                row = await self._row(conn, run_id)
                if not self._may_see(requester, row):
                    raise NotFound(f"training run {run_id} not found")
                rounds = (await conn.execute(select(trn_round).where(trn_round.c.run_id == run_id)
                                             .order_by(trn_round.c.round, trn_round.c.site_id))).mappings().all()
            if attempt == 2 or not self._orphaned(row):
                break
            await self.reap_orphans()
        return self._view(row, rounds)

    @staticmethod
    def _view(row, rounds=None) -> dict:
        out = {"id": row.run_id, "state": row.state, "round": row.round, "spec": orjson.loads(row.spec),
               "created": row.created_ts, "updated": row.updated_ts, "error": row.error,
               "model": {"name": row.model_name, "version": row.model_version, "weights_hash": row.weights_hash}
               if row.model_name else None,
               "lineage": orjson.loads(row.lineage) if row.lineage else None}
        if rounds is not None:
            per: dict[int, dict] = {}
            for r in rounds:
                per.setdefault(r["round"], {})[r["site_id"]] = {
                    "status": r["status"], "detail": r["detail"], "n_train": r["n_train"], "n_test": r["n_test"],
                    "metrics": orjson.loads(r["metrics"]) if r["metrics"] else None,
                    "consent_hash": r["consent_hash"], "manifest_hash": r["manifest_hash"], "train_s": r["train_s"],
                    "energy_j": r["energy_j"], "co2e_g": r["co2e_g"], "update_norm": r["update_norm"]}
            out["rounds"] = [{"round": k, "sites": v} for k, v in sorted(per.items())]
        return out

    async def list(self, requester: Requester) -> list[dict]:
        async with self.db.read() as conn:
            rows = (await conn.execute(select(trn_run).order_by(trn_run.c.created_ts.desc()).limit(500))).all()
        if any(self._orphaned(r) for r in rows):
            await self.reap_orphans()
            async with self.db.read() as conn:
                rows = (await conn.execute(select(trn_run).order_by(trn_run.c.created_ts.desc()).limit(500))).all()
        return [self._view(r) for r in rows if self._may_see(requester, r)]

    async def cancel(self, requester: Requester, run_id: str) -> dict:
        async with self.db.read() as conn:
            row = await self._row(conn, run_id)
        if not self._may_see(requester, row):
            raise NotFound(f"training run {run_id} not found")
        if row.state in ("succeeded", "failed", "cancelled"):
            raise Conflict(f"training run {run_id} is already {row.state}")
        self._cancel.add(run_id)
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._set(run_id, state="cancelled", error="cancelled by " + requester.subject)
        await self.audit.record(AccessRecord(requester, "U", "training-run", "0", detail=f"run={run_id} cancelled"))
        return await self.get(requester, run_id)

    async def close(self) -> None:
        for run_id, task in list(self._tasks.items()):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await self._set(run_id, state="failed", error="the hub stopped during the run", active_only=True)

    async def _set(self, run_id: str, *, active_only: bool = False, **values) -> None:
        """Update the run's row; ``active_only``: only while it is queued/running (a cancellation made
        through another server process is never overwritten by this process's run task)."""
        q = update(trn_run).where(trn_run.c.run_id == run_id)
        if active_only:
            q = q.where(trn_run.c.state.in_(("queued", "running")))
        async with self.db.write() as conn:
            await conn.execute(q.values(updated_ts=time.time(), **values))

    async def _watch_cancel(self, run_id: str, task: asyncio.Task) -> None:
        """Cancel the run's task when its row says cancelled: ``POST .../cancel`` may reach another server
        process (``processes`` > 1) than the one running the rounds; the store is what they share.  Also
        the run's heartbeat: its row's ``updated_ts`` is touched every ``heartbeat_s``, so a hub process
        that died during the run (SIGKILL, power loss) is recognised by every other (:meth:`reap_orphans`)."""
        beat = time.monotonic()
        while True:
            await asyncio.sleep(min(CANCEL_POLL_S, self.cfg.heartbeat_s))
            try:
                if time.monotonic() - beat >= self.cfg.heartbeat_s:
                    await self._set(run_id, active_only=True)
                    beat = time.monotonic()
                async with self.db.read() as conn:
                    state = (await conn.execute(select(trn_run.c.state).where(trn_run.c.run_id == run_id))).scalar()
            except SQLAlchemyError:
                continue
            if state == "cancelled":
                self._cancel.add(run_id)
                task.cancel()
                return

    # ------------------------------------------------------------------------------------ the run
    async def _run(self, run_id: str, spec: RunSpec, requester: Requester) -> None:
        watch = asyncio.create_task(self._watch_cancel(run_id, asyncio.current_task()))
        try:
            await self._set(run_id, state="running", active_only=True)
            await self._rounds(run_id, spec, requester)
        except asyncio.CancelledError:
            raise
        except RunFailed as exc:
            await self._set(run_id, state="failed", error=str(exc), active_only=True)
        except (GatewayError, ValueError, OSError, RuntimeError) as exc:
            log.warning("training run %s failed: %s", run_id, type(exc).__name__)
            await self._set(run_id, state="failed", error=f"{type(exc).__name__}: {exc}", active_only=True)
        finally:
            watch.cancel()
            self._tasks.pop(run_id, None)

    def _sites(self, spec: RunSpec):
        return [s for s in self.fcfg.sites if spec.sites is None or s.id in spec.sites]

    async def _rounds(self, run_id: str, spec: RunSpec, requester: Requester) -> None:
        from inference import fl

        module = make_module(spec.architecture, spec.seed)
        state = fl.state_from_module(module)
        sites = self._sites(spec)
        lineage: dict[str, Any] = {
            "run_id": run_id, "architecture": spec.architecture, "hub": self.fcfg.hub_id,
            "hyperparameters": {"rounds": spec.rounds, "local_epochs": spec.local_epochs,
                                "optimizer": spec.optimiser.json(), "min_sites": spec.min_sites,
                                "min_cohort": spec.min_cohort, "seed": spec.seed, "test_fraction": spec.test_fraction},
            "purpose": requester.purpose.describe(),
            "cohort_hash": hashlib.sha256(orjson.dumps(spec.cohort, option=orjson.OPT_SORT_KEYS)).hexdigest(),
            "label_hash": hashlib.sha256(orjson.dumps(spec.label, option=orjson.OPT_SORT_KEYS)).hexdigest(),
            "initial_weights_hash": fl.state_hash(state), "aggregation": "fedavg (sample-count weighted)",
            "secure_aggregation": spec.secure_aggregation, "dp": None, "rounds": [],
            "energy_j": 0.0, "co2e_g": 0.0}
        if spec.dp:
            lineage["aggregation"] = "dp-fedavg (clipped updates, equal weights, Gaussian noise at the hub)"
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big"))
        for rnd in range(1, spec.rounds + 1):
            if run_id in self._cancel:
                return
            t0 = time.perf_counter()
            answers, participants = await self._round_with_retry(run_id, rnd, spec, requester, state, sites)
            t_sites = time.perf_counter()
            ok = [a for a in answers if a["status"] == "ok"]
            state = await asyncio.to_thread(self._aggregate, spec, state, ok, rng)
            t_agg = time.perf_counter() - t_sites
            wall = time.perf_counter() - t0
            max_train = max((a["train_s"] for a in ok), default=0.0)
            max_eval = max((a.get("eval_s") or 0.0 for a in ok), default=0.0)
            max_site = max((a.get("site_s") or 0.0 for a in ok), default=0.0)
            e = sum(a.get("energy_j") or 0.0 for a in ok)
            co2 = sum(a.get("co2e_g") or 0.0 for a in ok)
            lineage["energy_j"] += e
            lineage["co2e_g"] += co2
            lineage["rounds"].append({
                "round": rnd, "weights_hash": fl.state_hash(state), "wall_s": round(wall, 4),
                "max_train_s": round(max_train, 4), "max_eval_s": round(max_eval, 4),
                "max_site_s": round(max_site, 4), "aggregate_s": round(t_agg, 5),
                "overhead_s": round(wall - max_train, 4), "energy_j": round(e, 3), "co2e_g": round(co2, 6),
                "participants": participants,
                "sites": {a["site"]: ({"status": "ok", "n_train": a["n_train"], "n_test": a["n_test"],
                                       "consent_hash": a["consent_hash"], "manifest_hash": a["manifest_hash"]}
                                      if a["status"] == "ok" else {"status": a["status"]}) for a in answers}})
            async with self.db.write() as conn:
                await conn.execute(update(trn_run).where(trn_run.c.run_id == run_id).values(
                    round=rnd, updated_ts=time.time(), lineage=orjson.dumps(lineage).decode()))
        # final held-out evaluation of the last global weights at every site
        answers = await asyncio.gather(*(self._ask(run_id, spec.rounds + 1, s, spec, requester, state,
                                                   train=False) for s in sites))
        await self._record(run_id, spec.rounds + 1, answers)
        lineage["final_evaluation"] = {a["site"]: a["metrics"] for a in answers if a["status"] == "ok"}
        lineage["final_evaluation_pooled"] = pooled_metrics(lineage["final_evaluation"])
        if spec.dp:
            lineage["dp"] = {**spec.dp, "unit": "site (one site's whole update per round)",
                             "epsilon": fl.dp_epsilon(spec.dp["noise_multiplier"], spec.rounds, spec.dp["delta"]),
                             "accountant": "RDP of the Gaussian mechanism, composed over rounds, no sampling amplification"}
        await self._export(run_id, spec, state, lineage, requester)

    async def _round_with_retry(self, run_id, rnd, spec, requester, state, sites):
        keys: dict[str, str] | None = None
        for attempt in (1, 2):
            if spec.secure_aggregation:
                keys = await self._site_keys(sites, requester)
                if len(keys) < spec.min_sites:
                    raise RunFailed(f"round {rnd}: only {len(keys)} site(s) reachable for secure aggregation "
                                    f"(min_sites {spec.min_sites})")
            targets = [s for s in sites if keys is None or s.id in keys]
            answers = await asyncio.gather(*(self._ask(run_id, rnd, s, spec, requester, state, train=True,
                                                       participants=keys) for s in targets))
            answers += [{"site": s.id, "status": "error", "detail": "no key"} for s in sites if s not in targets]
            ok = [a for a in answers if a["status"] == "ok"]
            if keys is not None and len(ok) != len(keys) and len(ok) >= spec.min_sites and attempt == 1:
                # a masked participant dropped out: its masks do not cancel; redo the round without it
                sites = [s for s in sites if s.id in {a["site"] for a in ok}]
                continue
            await self._record(run_id, rnd, answers)
            if len(ok) < spec.min_sites:
                failed = ", ".join(f"{a['site']}: {a['status']}" for a in answers if a["status"] != "ok")
                raise RunFailed(f"round {rnd}: {len(ok)} site(s) answered, fewer than min_sites {spec.min_sites} "
                                f"({failed})")
            return answers, sorted(a["site"] for a in ok)
        raise RunFailed(f"round {rnd}: secure aggregation participants kept dropping out")

    async def _site_keys(self, sites, requester: Requester) -> dict[str, str]:
        async def one(s):
            token = sign_hub_token(self.key, self.fcfg.hub_id, s.id, requester, b"", self.fcfg.token_ttl_s)
            try:
                async with asyncio.timeout(10):
                    async with self.session.get(s.url + "/federation/train/key",
                                                headers={"Authorization": f"Bearer {token}"}) as r:
                        if r.status == 200:
                            return s.id, (await r.json())["public_key"]
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
                pass
            return s.id, None

        return {k: v for k, v in await asyncio.gather(*(one(s) for s in sites)) if v}

    async def _ask(self, run_id, rnd, site, spec: RunSpec, requester, state, *, train: bool,
                   participants: dict[str, str] | None = None) -> dict:
        from inference import fl

        body = orjson.dumps({
            "run_id": run_id, "round": rnd, "architecture": spec.architecture, "cohort": spec.cohort,
            "label": spec.label, "images": spec.images, "local_epochs": spec.local_epochs,
            "optimizer": spec.optimiser.json(), "min_cohort": spec.min_cohort, "seed": spec.seed,
            "test_fraction": spec.test_fraction, "weights": _b64(fl.encode_state(state)), "train": train,
            "dp_clip": spec.dp["clip"] if spec.dp else None,
            "secure": {"participants": participants} if participants else None})
        token = sign_hub_token(self.key, self.fcfg.hub_id, site.id, requester, body, self.fcfg.token_ttl_s)
        out: dict[str, Any] = {"site": site.id}
        try:
            async with asyncio.timeout(self.cfg.round_deadline_s):
                async with self.session.post(site.url + "/federation/train/round", data=body, headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                    payload = await r.read()
                    status = r.status
        except asyncio.TimeoutError:
            return out | {"status": "timeout", "detail": f"no answer within {self.cfg.round_deadline_s} s"}
        except aiohttp.ClientError as exc:
            return out | {"status": "error", "detail": f"unreachable ({type(exc).__name__})"}
        if status == 200:
            try:
                doc = orjson.loads(payload)
                if train:
                    upd = fl.decode_state(base64.b64decode(doc["update"]))
                    doc["_update"] = upd
                return out | doc | {"status": "ok"}
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
                return out | {"status": "error", "detail": "malformed answer"}
        detail = _detail(payload)
        return out | {"status": "refused" if status in (401, 403, 422) else "error", "http_status": status,
                      "detail": detail}

    def _aggregate(self, spec: RunSpec, state, ok: list[dict], rng):
        from inference import fl

        if spec.secure_aggregation:
            avg = fl.secure_average([a["_update"] for a in ok], sum(float(a["weight"]) for a in ok))
        elif spec.dp:
            avg = fl.fedavg([(a["_update"], 1.0) for a in ok])
        else:
            avg = fl.fedavg([(a["_update"], float(a["n_train"])) for a in ok])
        if spec.dp:
            std = spec.dp["noise_multiplier"] * spec.dp["clip"] / len(ok)
            avg = fl.add(avg, fl.gaussian_noise(avg, std, rng))
        new = fl.add(state, avg)
        return {k: np.asarray(v, dtype=np.float32) for k, v in new.items()}

    async def _record(self, run_id: str, rnd: int, answers: list[dict]) -> None:
        now = time.time()
        async with self.db.write() as conn:
            for a in answers:
                await conn.execute(trn_round.delete().where(trn_round.c.run_id == run_id, trn_round.c.round == rnd,
                                                            trn_round.c.site_id == a["site"]))
                await conn.execute(trn_round.insert().values(
                    run_id=run_id, round=rnd, site_id=a["site"], status=a["status"], detail=a.get("detail"),
                    n_train=a.get("n_train"), n_test=a.get("n_test"),
                    metrics=orjson.dumps(a["metrics"]).decode() if a.get("metrics") else None,
                    consent_hash=a.get("consent_hash"), manifest_hash=a.get("manifest_hash"), train_s=a.get("train_s"),
                    cpu_s=a.get("cpu_s"), gpu_s=a.get("gpu_s"), energy_j=a.get("energy_j"), co2e_g=a.get("co2e_g"),
                    update_norm=a.get("update_norm"), ts=now))

    async def _export(self, run_id: str, spec: RunSpec, state, lineage: dict, requester: Requester) -> None:
        from inference import fl

        weights_hash = fl.state_hash(state)
        lineage["weights_hash"] = weights_hash
        lineage["energy_j"] = round(lineage["energy_j"], 3)
        lineage["co2e_g"] = round(lineage["co2e_g"], 6)
        ts_bytes = await asyncio.to_thread(torchscript, spec.architecture, state)
        async with self.db.write() as conn:
            version = await next_model_version(conn, spec.name)
            card = derived_card(spec, version, lineage, requester)
            res = await conn.execute(update(trn_run).where(
                trn_run.c.run_id == run_id, trn_run.c.state == "running").values(
                state="succeeded", model_name=spec.name, model_version=version, weights_hash=weights_hash,
                lineage=orjson.dumps(lineage).decode(), updated_ts=time.time()))
            if res.rowcount != 1:  # cancelled meanwhile (possibly through another server process): no model
                return
            await conn.execute(trn_model.insert().values(
                name=spec.name, version=version, run_id=run_id, architecture=spec.architecture,
                weights_hash=weights_hash, torchscript=ts_bytes, card=orjson.dumps(card).decode(), created_ts=time.time()))

    # ------------------------------------------------------------------------------------ models
    async def models(self, requester: Requester, name: str | None = None) -> list[dict]:
        q = select(trn_model.c.name, trn_model.c.version, trn_model.c.run_id, trn_model.c.architecture,
                   trn_model.c.weights_hash, trn_model.c.card, trn_model.c.created_ts).order_by(
            trn_model.c.name, trn_model.c.created_ts)
        if name:
            q = q.where(trn_model.c.name == name)
        async with self.db.read() as conn:
            rows = (await conn.execute(q)).all()
        return [{"name": r.name, "version": r.version, "run_id": r.run_id, "architecture": r.architecture,
                 "weights_hash": r.weights_hash, "card": orjson.loads(r.card), "created": r.created_ts} for r in rows]

    async def model_bytes(self, name: str, version: str) -> tuple[bytes, dict]:
        async with self.db.read() as conn:
            row = (await conn.execute(select(trn_model).where(trn_model.c.name == name,
                                                              trn_model.c.version == version))).first()
        if row is None:
            raise NotFound(f"model {name} version {version} not found")
        return row.torchscript, orjson.loads(row.card)

    async def deploy(self, requester: Requester, name: str, version: str, doc: Any) -> dict:
        """Install (if needed) and activate ``name``/``version`` at the selected sites (roll-back = deploy
        an older version)."""
        if not requester.is_admin:
            raise Forbidden("deploying a model needs the admin role")
        ts_bytes, card = await self.model_bytes(name, version)
        if not isinstance(doc, dict):
            raise BadRequest('request body: {"sites": [site ids]} or empty (all sites)', expression=["$"])
        wanted = doc.get("sites")
        ids = {s.id for s in self.fcfg.sites}
        if wanted is not None and (not isinstance(wanted, list) or not wanted or any(w not in ids for w in wanted)):
            raise BadRequest("sites: a non-empty list of configured site ids", expression=["$.sites"])
        sites = [s for s in self.fcfg.sites if wanted is None or s.id in wanted]
        arch = card.get("provenance", {}).get("lineage", {}).get("architecture")
        body = orjson.dumps({"card": card, "model": _b64(ts_bytes), "architecture": arch})

        async def one(site) -> dict:
            token = sign_hub_token(self.key, self.fcfg.hub_id, site.id, requester, body, self.fcfg.token_ttl_s)
            try:
                async with asyncio.timeout(60):
                    async with self.session.post(site.url + "/federation/models/deploy", data=body, headers={
                            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                        payload = await r.read()
                        if r.status == 200:
                            return {"site": site.id, "status": "ok", **orjson.loads(payload)}
                        return {"site": site.id, "status": "refused" if r.status < 500 else "error",
                                "http_status": r.status, "detail": _detail(payload)}
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return {"site": site.id, "status": "error", "detail": f"unreachable ({type(exc).__name__})"}

        results = await asyncio.gather(*(one(s) for s in sites))
        await self.audit.record(AccessRecord(requester, "U", "model-deploy", "0",
                                             detail=f"model {name}@{version} → {len(results)} site(s)"))
        return {"model": name, "version": version, "sites": results}


class RunFailed(Exception):
    pass


def pooled_metrics(per_site: dict[str, dict]) -> dict:
    """Sample-weighted mean of the sites' held-out loss and AUROC (a summary; AUROC is not additive)."""
    n = sum(m.get("n") or 0 for m in per_site.values())
    if not n:
        return {"n": 0}
    out = {"n": n}
    for k in ("loss", "auroc", "accuracy", "dice"):
        vals = [(m.get(k), m.get("n") or 0) for m in per_site.values() if m.get(k) is not None]
        w = sum(c for _, c in vals)
        out[k] = round(sum(v * c for v, c in vals) / w, 4) if w else None
    return out


def torchscript(arch: str, state) -> bytes:
    import torch

    from inference import fl

    module = make_module(arch, 0)
    fl.load_state(module, state)
    module.eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(module, torch.zeros(1, 1, 64, 64)), buf)
    return buf.getvalue()


async def next_model_version(conn, name: str) -> str:
    """The next version number of model ``name`` ("1", "2", ...), on a write transaction that then
    inserts it.  Runs of the same model finishing together in two server processes (PostgreSQL) get one
    number each: the second waits on the advisory lock until the first has committed its version."""
    await xact_lock(conn, MODEL_LOCK_CLASS, name)
    n = (await conn.execute(select(func.count()).select_from(trn_model).where(trn_model.c.name == name))).scalar_one()
    return str(n + 1)


def derived_card(spec: RunSpec, version: str, lineage: dict, requester: Requester) -> dict:
    base = shipped_card(spec.architecture)
    purpose = next((c for c in requester.purpose.codes if c.startswith("DUO:")), "treatment")
    from inference.cards import DUO_PURPOSES

    if purpose not in DUO_PURPOSES:
        purpose = next((c for c in requester.purpose.codes if c in DUO_PURPOSES), "DUO:0000042")
    triton_model = spec.name.replace("-", "_").replace(".", "_")
    return {**base, "name": spec.name, "version": version,
            "description": f"{base.get('description', '')} Federated training run {lineage['run_id']}.",
            "triton": {**base["triton"], "model": triton_model, "version": version},
            "purpose": purpose, "auto_trigger": False,
            "provenance": {"training_data": f"federated: {len(lineage['rounds'])} round(s) across "
                                            f"{len({s for r in lineage['rounds'] for s in r['participants']})} site(s); "
                                            f"cohort {lineage['cohort_hash'][:12]}, label {lineage['label_hash'][:12]}",
                           "lineage_id": f"fedgate:training:{lineage['run_id']}",
                           "lineage": {k: lineage[k] for k in ("run_id", "architecture", "hyperparameters", "purpose",
                                                               "cohort_hash", "label_hash", "weights_hash", "energy_j",
                                                               "co2e_g", "secure_aggregation", "dp", "aggregation")},
                           "rounds": [{"round": r["round"], "weights_hash": r["weights_hash"],
                                       "sites": r["sites"]} for r in lineage["rounds"]]}}


__all__ = ["SiteTrainer", "TrainingHub", "TrainingConfig", "parse_spec", "ARCHITECTURES", "local_round",
           "evaluate", "energy", "torchscript"]
