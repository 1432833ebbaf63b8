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
import datetime as _dt
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlalchemy import select, update

from gateway.context import Purpose, Requester
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable, Unprocessable
from gateway.services.access import AccessRecord
from gateway.services.federation import SiteService, age_band, age_on
from gateway.services.training_spec import RunSpec, TrainingConfig, parse_optimiser, parse_spec
from gateway.settings import Settings
from gateway.store import training_reads
from gateway.store.blobs import BlobStore
from gateway.store.training_schema import trn_site_round
from inference.training import (
    ARCHITECTURES,
    Architecture,
    Optimiser,
    evaluate,
    evaluate_seg,
    load_seg_masks,
    load_slices,
    local_round,
    make_module,
    pooled_metrics,
    preprocess_of,
    shipped_card,
    split_is_test,
    torchscript,
)

log = logging.getLogger(__name__)


STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ANALYST_ROLES = ("analyst", "admin")
ID_CHUNK = 5000
#: Pixel cache per site (preprocessed 64×64 slices ≈ 16 KB each): rounds after the first read no files.
PIXEL_CACHE_MAX = 50_000
SUBGROUPS = ("sex", "age_band", "manufacturer")


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
                               "patients_test": len({r[0] for r in manifest["test"]}),
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
        from mappings.cohort import parse

        today = _dt.date.today()
        async with self.db.read() as conn:
            members, positive, found = await training_reads.cohort_instances(
                conn, scope, parse(spec.cohort, "$.cohort"), parse(spec.label, "$.label"), expand=self.expand,
                today=today, modalities=spec.images.get("modality") or None)
            rows, consent, seen = [], [], set()
            for r in found:
                if r.sop_uid in seen:
                    continue
                seen.add(r.sop_uid)
                rows.append((r.patient_id, r.sop_uid, split_is_test(spec.seed, r.patient_id, spec.test_fraction),
                             int(r.patient_id in positive), r.blob_path, r.sex or "unknown",
                             age_band(age_on(r.birth_date, today)) or "unknown",
                             (r.manufacturer or "unknown").strip()))
                consent.append((r.patient_id, r.consent_profile))
            segs = []
            if ARCHITECTURES[spec.architecture].task == "segmentation":
                want = parse(spec.label, "$.label").body.segments[0]
                segs = await training_reads.seg_items(conn, scope, members, want)
        return {"rows": rows, "consent": sorted(set(consent)), "segs": segs}

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
            # a research scope sees its permitted patients' entries only (None: every entry)
            visible = await training_reads.visible_patients(conn, scope) if rows else None
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


def __getattr__(name: str) -> Any:
    """The hub side lives in :mod:`gateway.services.training_hub` (it imports this module)."""
    if name in ("TrainingHub", "RunFailed", "next_model_version", "derived_card"):
        from gateway.services import training_hub

        return getattr(training_hub, name)
    raise AttributeError(name)


__all__ = ["SiteTrainer", "TrainingConfig", "RunSpec", "parse_spec", "parse_optimiser", "energy",
           # re-exported from inference.training (the pure part)
           "ARCHITECTURES", "Architecture", "Optimiser", "evaluate", "evaluate_seg", "local_round", "make_module",
           "pooled_metrics", "shipped_card", "split_is_test", "torchscript"]
