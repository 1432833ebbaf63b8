"""Federated training: the site configuration (``[training]``) and the run specification a hub accepts
(``POST /training/runs``), parsed and validated into frozen dataclasses (docs/training.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gateway.errors import BadRequest, Unprocessable
from gateway.settings import Settings, SettingsError
from inference.training import ARCHITECTURES, Optimiser

log = logging.getLogger(__name__)


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
    lease_s: float = 60.0  # hub: a run's lease in the run queue (renewed every third); expired → another process resumes it
    poll_s: float = 1.0  # hub: how often an idle run-queue worker looks for runs (new ones wake it at once)
    max_runs: int = 8  # hub: runs one hub process runs at a time (the others wait, queued)
    max_attempts: int = 5  # hub: a run whose hub process died this many times fails
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
        for f in ("min_cohort", "min_cell", "max_rounds", "max_runs", "max_attempts"):
            if f in raw:
                kw[f] = int(raw[f])
        for f in ("cpu_watts", "gpu_watts", "carbon_g_per_kwh", "round_deadline_s", "lease_s", "poll_s"):
            if f in raw:
                kw[f] = float(raw[f])
        for f in ("device", "repository", "key_file"):
            if raw.get(f):
                kw[f] = str(raw[f])
        cfg = cls(**kw)
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise SettingsError("setting 'training.device': auto, cpu or cuda")
        for f in ("lease_s", "poll_s", "max_runs", "max_attempts"):
            if getattr(cfg, f) <= 0:
                raise SettingsError(f"setting 'training.{f}': a positive number")
        return cfg

    def repository_path(self, settings: Settings) -> Path:
        return Path(self.repository) if self.repository else settings.data_dir / "model_repository"


def _curie(code: str) -> str:
    prefix = "http://purl.obolibrary.org/obo/DUO_"
    return "DUO:" + code[len(prefix):] if code.startswith(prefix) else code


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

    @classmethod
    def from_json(cls, doc: Any, cfg: TrainingConfig, site_ids: tuple[str, ...]) -> "RunSpec":
        """The run specification of a ``POST /training/runs`` body, validated (:func:`parse_spec`)."""
        return parse_spec(doc, cfg, site_ids)


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
