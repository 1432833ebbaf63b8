"""Model-to-data inference: model cards, persisted jobs, the worker that runs them, results.

Flow of one job: claim (conditional UPDATE with a lease) → the series' instances *visible to the job's
requester under the job's purpose* (consent gate scope) → pixel data from the blob files → card
pre-processing → backend (embedded torch or Triton/KServe v2) → DICOM SEG + SR (TID 1500) stored through the
DICOMweb service (QIDO/WADO find them) → FHIR Observations + DiagnosticReport linked to the ImagingStudy →
job succeeded (only by the lease holder).  Result UIDs and FHIR ids derive from the job id, so a job re-run
after a crash writes the same objects again instead of new ones (exactly one SR/SEG/report per job).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.context import SYSTEM, Purpose, Requester
from gateway.errors import BadRequest, Conflict, Forbidden, GatewayError, NotFound, Unprocessable
from gateway.services.access import AccessRecord, AuditSink, Gate
from gateway.store import inference_reads as reads
from gateway.store.db import Database
from gateway.store.jobs_schema import inf_job, inf_model_card
from gateway.store.leases import LeasedQueue, poll_worker
from gateway.store.model_cards import CardConflict, card_view, registered_cards, store_card  # noqa: F401 (card_view: API)
from inference import preprocess
from inference.backends import Backend, BackendError, BackendUnavailable
from inference.cards import PURPOSE_TREATMENT, CardError, ModelCard, parse_card, shipped_cards

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed")
#: A cohort job request may fan out to at most this many series.
MAX_COHORT_SERIES = 1000
#: Errors that fail a job for good (a bug elsewhere still leaves the lease to expire and the job to re-run).
JOB_ERRORS = (BackendError, CardError, GatewayError, InvalidDicomError, ValueError, KeyError, IndexError,
              TypeError, AttributeError, OSError, RuntimeError, SQLAlchemyError)


@dataclass(frozen=True)
class InferenceConfig:
    poll_s: float = 1.0
    lease_s: float = 60.0
    settle_s: float = 10.0  # a series must be unchanged this long before auto-trigger
    auto_trigger: bool = False  # site setting inference.auto_trigger (on in the demo config)
    max_attempts: int = 100  # server-unavailable re-queues before a job fails
    requeue_base_s: float = 1.0
    requeue_max_s: float = 60.0
    push_url: str = ""  # optional: also STOW-RS the SR/SEG to this DICOMweb base URL (a PACS)
    push_token: str = ""  # bearer token for push_url (kept out of logs)
    site_id: str = "site-local"
    cpu_watts: float = 15.0  # energy estimate: CPU seconds of the inference × this (J); set per site hardware
    drift_alert: float = 0.2  # PSI above this raises an alert
    carbon_g_per_kwh: float = 350.0  # grid carbon intensity for the CO2e estimate (as training's)

    @classmethod
    def from_extra(cls, d: dict[str, Any]) -> "InferenceConfig":
        kw = {}
        for f in ("poll_s", "lease_s", "settle_s", "requeue_base_s", "requeue_max_s"):
            if f in d:
                kw[f] = float(d[f])
        if "max_attempts" in d:
            kw["max_attempts"] = int(d["max_attempts"])
        for f in ("push_url", "push_token"):
            if d.get(f):
                kw[f] = str(d[f])
        if "auto_trigger" in d:
            kw["auto_trigger"] = bool(d["auto_trigger"])
        for f in ("cpu_watts", "drift_alert", "carbon_g_per_kwh"):
            if f in d:
                kw[f] = float(d[f])
        if d.get("site_id"):
            kw["site_id"] = str(d["site_id"])
        return cls(**kw)


def _requester_json(r: Requester) -> str:
    return orjson.dumps({"subject": r.subject, "roles": sorted(r.roles), "organization": r.organization,
                         "attributes": dict(r.attributes)}).decode()


def _purpose_json(p: Purpose) -> str:
    return orjson.dumps({"kind": p.kind, "codes": list(p.codes), "diseases": list(p.diseases)}).decode()


def _job_requester(row) -> Requester:
    r = orjson.loads(row.requester)
    p = orjson.loads(row.purpose)
    return Requester(r["subject"], frozenset(r["roles"]), r.get("organization"), r.get("attributes") or {},
                     Purpose(p["kind"], tuple(p["codes"]), tuple(p["diseases"])))


def job_view(row) -> dict[str, Any]:
    return {
        "id": row.job_id, "model": {"name": row.model_name, "version": row.model_version},
        "study": row.study_uid, "series": row.series_uid, "trigger": row.trigger,
        "purpose": orjson.loads(row.purpose), "state": row.state, "attempts": row.attempts,
        "created": row.created_ts, "updated": row.updated_ts, "error": row.error,
        "result": orjson.loads(row.result) if row.result else None,
    }


class InferenceService:
    def __init__(self, db: Database, gate: Gate, audit: AuditSink, backend: Backend, dicomweb, fhir,
                 config: InferenceConfig) -> None:
        self.db, self.gate, self.audit, self.backend = db, gate, audit, backend
        self.dicomweb, self.fhir, self.config = dicomweb, fhir, config
        self.worker_id = uuid.uuid4().hex
        self._queue = LeasedQueue(db, inf_job, "job_id", self.worker_id, config.lease_s)  # the leased job queue
        self._wake = asyncio.Event()
        self._scan_mark = 0.0
        self.sent: list[dict] = []  # what went to the model (series, sop uids) — recent, bounded; for audits/tests

    # ------------------------------------------------------------------------------------ model cards
    async def register(self, requester: Requester, doc: Any, *, system: bool = False) -> tuple[dict, bool]:
        if not system and not requester.is_admin:
            raise Forbidden("registering a model card needs the admin role")
        try:
            card = parse_card(doc)
        except CardError as e:
            raise Unprocessable(f"model card: {e}") from None
        if not system and not await self.backend.ready(card.triton_model, card.triton_version):
            raise Unprocessable(f"triton.model: {card.triton_model} version {card.triton_version} is not "
                                f"available on the inference backend")
        async with self.db.write() as conn:
            try:
                view, created = await store_card(conn, card.name, card.version, card.purpose, doc, requester.subject)
            except CardConflict:
                raise Conflict(f"model card {card.key} is already registered with different content; "
                               f"register a new version") from None
        if not created:
            return view, False
        self._wake.set()
        return view, True

    async def cards(self) -> list[dict]:
        async with self.db.read() as conn:
            return await registered_cards(conn)

    async def _card(self, conn, name: str, version: str | None) -> ModelCard:
        q = select(inf_model_card).where(inf_model_card.c.name == name, inf_model_card.c.enabled == 1)
        if version:
            q = q.where(inf_model_card.c.version == version)
        rows = (await conn.execute(q)).all()
        if not rows:
            raise NotFound(f"model {name}{'@' + version if version else ''} is not registered")
        row = max(rows, key=lambda r: r.registered_ts)
        return parse_card(orjson.loads(row.card))

    async def register_shipped(self) -> None:
        """The cards of the models fedgate ships (the server may come up later: no readiness check)."""
        for card in shipped_cards():
            await self.register(SYSTEM, card.raw, system=True)

    # ------------------------------------------------------------------------------------------- jobs
    async def submit(self, requester: Requester, body: Any) -> tuple[list[dict], bool]:
        """POST /inference/jobs: {model, version?, study, series?} or {model, version?, cohort} → jobs (one per
        matching series; a cohort is the federation's cohort language, evaluated within the requester's scope)."""
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object {model, version?, study, series?} or {model, version?, cohort}")
        name, version = body.get("model"), body.get("version")
        study, series = body.get("study"), body.get("series")
        if "cohort" in body:
            return await self._submit_cohort(requester, name, version, body["cohort"])
        for f, v, req in (("model", name, True), ("version", version, False), ("study", study, True),
                          ("series", series, False)):
            if (v is None and req) or (v is not None and (not isinstance(v, str) or not v or len(v) > 64)):
                raise BadRequest(f"{f}: expected a non-empty string")
        scope = await self.gate.scope_for(requester)  # the gate first: no read before its decision
        async with self.db.read() as conn:
            card = await self._card(conn, name, version)
        self._check_purpose(requester, card)
        async with self.db.read() as conn:
            rows = await reads.study_series(conn, scope, study, series)
            if not rows:
                raise NotFound(f"{'series ' + series if series else 'study ' + study} not found")
            sops = await reads.sop_classes(conn, scope, [r["series_uid"] for r in rows])
        matching = [r for r in rows if card.selector.matches(r, sops.get(r["series_uid"], set()))]
        if not matching:
            raise Unprocessable(f"selector: no series of study {study} matches model {card.key}")
        created_any = False
        jobs = []
        for r in matching:
            # one job per requester+model+series for requests (a repeated POST returns the same job)
            key = f"request|{card.key}|{r['series_uid']}|{requester.subject}|{requester.purpose.describe()}"
            job, created = await self._insert_job(card, study, r["series_uid"], "request", requester, key)
            created_any |= created
            jobs.append(job)
        await self.audit.record(AccessRecord(requester, "C", "inference-job", "0",
                                             (f"ImagingStudy/{study}",), (), "",
                                             f"model {card.key}"))
        self._wake.set()
        return jobs, created_any

    async def _submit_cohort(self, requester: Requester, name: Any, version: Any, cohort: Any) -> tuple[list[dict], bool]:
        from mappings.cohort import CohortError, parse

        if not isinstance(name, str) or not name or (version is not None and not isinstance(version, str)):
            raise BadRequest("model: expected a non-empty string")
        try:
            root = parse(cohort, "$.cohort")
        except CohortError as exc:
            raise BadRequest(str(exc), expression=[exc.field]) from None
        scope = await self.gate.scope_for(requester)  # the gate first: no read before its decision
        async with self.db.read() as conn:
            card = await self._card(conn, name, version)
        self._check_purpose(requester, card)
        async with self.db.read() as conn:
            rows = await reads.cohort_series(conn, scope, root, MAX_COHORT_SERIES + 1)
            sops = await reads.sop_classes(conn, scope, [r["series_uid"] for r in rows])
        if len(rows) > MAX_COHORT_SERIES:
            raise Unprocessable(f"cohort: more than {MAX_COHORT_SERIES} series; narrow the cohort")
        matching = [r for r in rows if card.selector.matches(r, sops.get(r["series_uid"], set()))]
        jobs, created_any = [], False
        for r in matching:
            key = f"request|{card.key}|{r['series_uid']}|{requester.subject}|{requester.purpose.describe()}"
            job, created = await self._insert_job(card, r["study_uid"], r["series_uid"], "request", requester, key)
            created_any |= created
            jobs.append(job)
        await self.audit.record(AccessRecord(requester, "C", "inference-job", "0",
                                             tuple(sorted({f"ImagingStudy/{r['study_uid']}" for r in matching}))[:200],
                                             (), scope.summary, f"model {card.key}, cohort: {len(matching)} series"))
        self._wake.set()
        return jobs, created_any

    def _check_purpose(self, requester: Requester, card: ModelCard) -> None:
        if card.purpose == PURPOSE_TREATMENT:
            if not requester.purpose.is_treatment:
                raise Forbidden(f"model {card.key} is a clinical-care model: it runs under the treatment purpose")
        else:
            if requester.purpose.is_treatment or card.purpose not in requester.purpose.codes:
                raise Forbidden(f"model {card.key} is registered for research purpose {card.purpose}: "
                                f"the request must state it (purpose codes)")

    async def _insert_job(self, card: ModelCard, study: str, series: str, trigger: str, requester: Requester,
                          key: str) -> tuple[dict, bool]:
        now = time.time()
        job_id = uuid.uuid4().hex
        try:
            async with self.db.write() as conn:
                existing = (await conn.execute(select(inf_job).where(inf_job.c.dedupe_key == key))).first()
                if existing is not None:
                    return job_view(existing), False
                await conn.execute(inf_job.insert().values(
                    job_id=job_id, model_name=card.name, model_version=card.version, study_uid=study,
                    series_uid=series, trigger=trigger, requester=_requester_json(requester),
                    purpose=_purpose_json(requester.purpose), state="queued", attempts=0, not_before=now,
                    created_ts=now, updated_ts=now, dedupe_key=key))
                row = (await conn.execute(select(inf_job).where(inf_job.c.job_id == job_id))).one()
        except IntegrityError:  # a concurrent insert of the same key won
            async with self.db.read() as conn:
                row = (await conn.execute(select(inf_job).where(inf_job.c.dedupe_key == key))).one()
            return job_view(row), False
        return job_view(row), True

    async def job(self, requester: Requester, job_id: str) -> dict:
        scope = await self.gate.scope_for(requester)
        async with self.db.read() as conn:
            row = (await conn.execute(select(inf_job).where(inf_job.c.job_id == job_id))).first()
            visible = await reads.visible_series(conn, scope, [row.series_uid] if row is not None else [])
        if row is None or not self._may_see(requester, row) or row.series_uid not in visible:
            raise NotFound(f"job {job_id} not found")
        return job_view(row)

    async def jobs(self, requester: Requester, state: str | None = None, study: str | None = None,
                   limit: int = 100) -> list[dict]:
        if state is not None and state not in STATES:
            raise BadRequest(f"state: one of {', '.join(STATES)}")
        q = select(inf_job).order_by(inf_job.c.created_ts.desc()).limit(limit)
        if state:
            q = q.where(inf_job.c.state == state)
        if study:
            q = q.where(inf_job.c.study_uid == study)
        scope = await self.gate.scope_for(requester)
        async with self.db.read() as conn:
            rows = (await conn.execute(q)).all()
            # a job's results are its series' patient data: a research scope sees permitted patients' jobs only
            visible = await reads.visible_series(conn, scope, [r.series_uid for r in rows])
        return [job_view(r) for r in rows if self._may_see(requester, r) and r.series_uid in visible]

    @staticmethod
    def _may_see(requester: Requester, row) -> bool:
        return requester.is_admin or orjson.loads(row.requester)["subject"] == requester.subject

    # ------------------------------------------------------------------------------------ auto-trigger
    async def scan_new_series(self) -> int:
        """Queue jobs for settled series that match an auto-trigger (treatment) model."""
        cfg = self.config
        horizon = time.time() - cfg.settle_s
        scope = await self.gate.scope_for(SYSTEM)  # treatment models over the site's own new series
        async with self.db.read() as conn:
            cards = [parse_card(orjson.loads(r.card)) for r in (await conn.execute(
                select(inf_model_card.c.card).where(inf_model_card.c.enabled == 1))).all()]
            cards = [c for c in cards if c.auto_trigger and c.purpose == PURPOSE_TREATMENT]
            if not cards:
                return 0
            rows = await reads.settled_series(conn, scope, self._scan_mark, horizon)
            sops = await reads.sop_classes(conn, scope, [r["series_uid"] for r in rows]) if rows else {}
        n = 0
        for r in rows:
            for c in cards:
                if c.selector.matches(r, sops.get(r["series_uid"], set())):
                    _, created = await self._insert_job(c, r["study_uid"], r["series_uid"], "auto", SYSTEM,
                                                        f"auto|{c.key}|{r['series_uid']}|{r['num_instances']}")
                    n += created
        self._scan_mark = max([self._scan_mark] + [r["updated_ts"] for r in rows])
        return n

    # ------------------------------------------------------------------------------------------ worker
    async def claim(self) -> Any | None:
        return await self._queue.claim()

    async def _finish(self, job_id: str, **values: Any) -> bool:
        return await self._queue.finish(job_id, **values)

    async def _heartbeat(self, job_id: str) -> None:
        await self._queue.heartbeat(job_id)

    async def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        row = await self.claim()
        if row is None:
            return False
        hb = asyncio.create_task(self._heartbeat(row.job_id))
        try:
            result = await self.execute(row)
        except BackendUnavailable as e:
            cfg = self.config
            if row.attempts >= cfg.max_attempts:
                await self._finish(row.job_id, state="failed", error=f"inference server unavailable: {e}",
                                   lease_owner=None, lease_until=None)
            else:
                delay = min(cfg.requeue_max_s, cfg.requeue_base_s * 2 ** min(row.attempts - 1, 16))
                await self._finish(row.job_id, state="queued", error=f"retrying: {e}", lease_owner=None,
                                   lease_until=None, not_before=time.time() + delay)
            log.info("inference job re-queued", extra={"job": row.job_id, "attempts": row.attempts})
        except asyncio.CancelledError:
            # graceful shutdown: hand the job back at once (a crash instead leaves the lease to expire)
            await asyncio.shield(self._finish(row.job_id, state="queued", lease_owner=None, lease_until=None))
            raise
        except JOB_ERRORS as e:
            log.warning("inference job failed", extra={"job": row.job_id, "error": type(e).__name__})
            await self._finish(row.job_id, state="failed", error=str(e)[:2000], lease_owner=None, lease_until=None)
        else:
            await self._finish(row.job_id, state="succeeded", error=None, result=orjson.dumps(result).decode(),
                               lease_owner=None, lease_until=None)
        finally:
            hb.cancel()
        return True

    async def worker(self) -> None:
        async def scan() -> None:
            if self.config.auto_trigger:
                await self.scan_new_series()

        await poll_worker("inference", self.run_once, self._wake, lambda: self.config.poll_s, scan)

    # ---------------------------------------------------------------------------------------- execute
    async def execute(self, row) -> dict[str, Any]:
        async with self.db.read() as conn:
            card = await self._card(conn, row.model_name, row.model_version)
        requester = _job_requester(row)
        self._check_purpose(requester, card)
        scope = await self.gate.scope_for(requester)
        async with self.db.read() as conn:
            inst = await reads.series_instances(conn, scope, row.series_uid)
        if card.selector.sop_class:
            inst = [i for i in inst if i["sop_class_uid"] in card.selector.sop_class]
        if not inst:
            raise Unprocessable(f"series {row.series_uid}: no instance is visible for the job's purpose")
        paths = [self.dicomweb.blob_path(dict(i)) for i in inst]
        datasets, x = await asyncio.to_thread(_load_and_prepare, paths, card)
        tensors = sorted({o.tensor for o in card.outputs})
        cpu0 = time.process_time()
        outputs = await self.backend.infer(card.triton_model, card.triton_version, card.input_tensor, x, tensors)
        cpu_s = time.process_time() - cpu0  # this process only: a remote Triton's own energy is not seen here
        self.sent.append({"job": row.job_id, "series": row.series_uid, "sops": [i["sop_uid"] for i in inst]})
        del self.sent[:-100]
        await self.audit.record(AccessRecord(
            requester, "R", "inference", "0", (f"ImagingStudy/{row.study_uid}",),
            tuple(sorted({i["patient_id"] for i in inst if i["patient_id"]}))[:200], scope.summary,
            f"model {card.key} on {len(inst)} instances"))
        from inference import results

        findings = results.summarise(card, outputs)
        monitor = {"input_mean": float(np.mean(x)), "input_std": float(np.std(x)), "cpu_s": round(cpu_s, 6),
                   "energy_j": round(cpu_s * self.config.cpu_watts, 6)}
        await self._observe(row, card, scope, inst[0]["patient_id"], findings, monitor)
        objects = await asyncio.to_thread(_build_objects, card, row.job_id, datasets, findings, outputs)
        stored = await self._store_dicom(objects)
        pushed = await self._push(objects) if self.config.push_url and objects else None
        fhir_ids = await self._write_fhir(card, row, inst[0]["patient_id"], findings, objects) \
            if "fhir" in card.encodings else {}
        return {
            "model": card.key, "instances": len(inst),
            "findings": [{"label": f.label, "code": f"{f.code.scheme}|{f.code.value}", "score": round(f.score, 6),
                          "positive": f.positive, "slices": list(f.slices), "voxels": f.volume_voxels}
                         for f in findings],
            "dicom": stored, "fhir": fhir_ids, "monitoring": monitor, **({"push": pushed} if pushed else {}),
        }

    async def _observe(self, row, card: ModelCard, scope, patient_id: str | None, findings, monitor: dict) -> None:
        """Record one monitoring row (re-runs of a job replace theirs)."""
        from gateway.store.jobs_schema import inf_observation
        from inference.monitoring import age_band

        async with self.db.write() as conn:
            se, pt = await reads.monitoring_context(conn, scope, row.series_uid, patient_id)
            await conn.execute(delete(inf_observation).where(inf_observation.c.job_id == row.job_id))
            first = findings[0] if findings else None
            await conn.execute(inf_observation.insert().values(
                job_id=row.job_id, model_name=card.name, model_version=card.version, site_id=self.config.site_id,
                study_uid=row.study_uid, ts=time.time(), score=first.score if first else None,
                positive=int(first.positive) if first else None, input_mean=monitor["input_mean"],
                input_std=monitor["input_std"], manufacturer=se.manufacturer if se else None,
                scanner_model=se.model_name if se else None, protocol=se.protocol_name if se else None,
                sex=pt.sex if pt else None,
                age_band=age_band(pt.birth_year, time.gmtime().tm_year) if pt else "unknown",
                cpu_s=monitor["cpu_s"], energy_j=monitor["energy_j"]))

    async def monitoring(self, requester: Requester, model: str, version: str | None, since: float | None,
                         scanner_key: str = "manufacturer") -> dict[str, Any]:
        """Drift, running performance against reference-standard Observations, and energy
        (:func:`gateway.services.inference_monitoring.report`)."""
        from gateway.services.inference_monitoring import report

        return await report(self, requester, model, version, since, scanner_key)

    async def _store_dicom(self, objects: dict[str, Any]) -> dict[str, str]:
        from gateway.services.dicomweb import DUPLICATE_SOP, Part

        parts, out = [], {}
        for kind, ds in objects.items():
            tmp = self.dicomweb.blobs.temp_path()
            await asyncio.to_thread(ds.save_as, tmp, enforce_file_format=True)
            parts.append(Part(tmp, tmp.stat().st_size))
            out[kind] = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID}
        if not parts:
            return out
        _, body = await self.dicomweb.store(SYSTEM, parts, None, "")
        for item in body.get("00081198", {}).get("Value", []):
            code = item["00081197"]["Value"][0]
            if code != DUPLICATE_SOP:  # a re-run writes the same UIDs: already stored is fine
                raise RuntimeError(f"storing inference results failed (0x{code:04X})")
        return out

    async def _push(self, objects: dict[str, Any]) -> str:
        """STOW-RS the results to the configured PACS (dicomweb-client); a failure is recorded, not fatal
        (the results are stored in fedgate either way)."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        headers = {"Authorization": f"Bearer {self.config.push_token}"} if self.config.push_token else None
        client = DICOMwebClient(url=self.config.push_url, headers=headers)
        try:
            await asyncio.to_thread(client.store_instances, list(objects.values()))
        except (requests.RequestException, OSError) as e:
            log.warning("inference results push failed", extra={"error": type(e).__name__})
            return f"failed: {type(e).__name__}"
        return "stored"

    async def _write_fhir(self, card: ModelCard, row, patient_id: str | None, findings, objects) -> dict[str, Any]:
        obs_ids = []
        subject = {"subject": {"reference": f"Patient/{patient_id}"}} if patient_id else {}
        device = {"display": f"{card.name} {card.version}"}
        for i, f in enumerate(findings):
            oid = f"inf-{row.job_id}-{i}"
            obs = {
                "resourceType": "Observation", "id": oid, "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "imaging"}]}],
                "code": {"coding": [_fhir_coding(f.code)], "text": f"{f.label} ({card.name} {card.version})"},
                **subject,
                "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct",
                                                     "code": "52101004" if f.positive else "2667000",
                                                     "display": "Present" if f.positive else "Absent"}]},
                "component": [{"code": {"text": "model score"}, "valueQuantity": {"value": round(f.score, 6),
                                                                                  "unit": "1"}}],
                "method": {"text": f"{card.name} {card.version} (lineage {card.provenance.get('lineage_id')})"},
                "derivedFrom": [{"reference": f"ImagingStudy/{row.study_uid}"}],
                "device": device,
            }
            await self.fhir.update(SYSTEM, "Observation", oid, obs, None)
            obs_ids.append(oid)
        rid = f"inf-{row.job_id}"
        conclusion = "; ".join(f"{f.label}: {'present' if f.positive else 'absent'} (score {f.score:.3f})"
                               for f in findings)
        report = {
            "resourceType": "DiagnosticReport", "id": rid, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
            "code": {"text": f"AI result: {card.name} {card.version}"},
            **subject,
            "issued": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "performer": [{"display": f"{card.name} {card.version}"}],
            "result": [{"reference": f"Observation/{o}"} for o in obs_ids],
            "imagingStudy": [{"reference": f"ImagingStudy/{row.study_uid}"}],
            "conclusion": conclusion,
        }
        await self.fhir.update(SYSTEM, "DiagnosticReport", rid, report, None)
        return {"DiagnosticReport": rid, "Observation": obs_ids}


REFERENCE_TAG_SYSTEM = "https://fedgate.dev/fhir/CodeSystem/tags"
_SCHEME_OF = {"http://snomed.info/sct": "SCT", "http://dicom.nema.org/resources/ontology/DCM": "DCM",
              "http://loinc.org": "LN"}


def _finding_codes(output) -> list:
    """The codes a card output reports findings with (classification classes / segmentation region types)."""
    return [code for _, code in output.classes] + [typ for _, _, typ in output.regions]


def _fhir_coding(code) -> dict[str, str]:
    system = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
              "LN": "http://loinc.org"}.get(code.scheme, f"urn:fedgate:{code.scheme}")
    return {"system": system, "code": code.value, "display": code.meaning}


def _load_and_prepare(paths: list[Path], card: ModelCard):
    datasets = [dcmread(p) for p in paths]
    slices = [(ds.pixel_array, float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))
              for ds in datasets]
    return datasets, preprocess.prepare_series(slices, card.preprocess)


def _build_objects(card: ModelCard, job_id: str, datasets, findings, outputs: dict[str, np.ndarray]) -> dict:
    from inference import results

    out: dict[str, Any] = {}
    seg = None
    if "seg" in card.encodings:
        o = next(o for o in card.outputs if o.kind == "segmentation")
        seg = results.build_seg(card, job_id, datasets, outputs[o.tensor])
        out["seg"] = seg
    if "sr" in card.encodings:
        out["sr"] = results.build_sr(card, job_id, datasets, findings, seg)
    return out
