"""Imaging cohort export (issue #24; docs/deidentification.md): studies → de-identified instances → a
DICOMweb server (STOW-RS, PS3.18 §10.5) or a folder with a DICOMDIR (PS3.10 §7.2, PS3.3 Annex F).

What is read goes through the consent gate exactly like WADO-RS: :meth:`DicomwebService.retrieve` with
the requester, so an export holds only the instances the requester could retrieve one by one (and each
read is audited there); a study with no visible instance is reported ``not-found`` whether it does not
exist or is refused.  Every instance is de-identified (:func:`mappings.deid.dicom.deidentify_dataset`)
with the keys of the export's project off the event loop; instances with burned-in annotation are
withheld and counted.  The per-study outcome report names studies by their source UID (the requester
gave them) and their exported UID.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gateway.context import Requester
from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.services.access import AccessRecord, Action, AuditSink, Interaction
from gateway.services.deid import DeidPolicy
from gateway.store.leases import poll_worker
from mappings.deid.dicom import DeidOptions, Withheld

log = logging.getLogger(__name__)

#: What reading or de-identifying one stored file may raise (pydicom's errors are ValueErrors and friends).
_UNREADABLE = (OSError, ValueError, TypeError, KeyError, AttributeError, EOFError)

#: Instances per STOW-RS request.
STOW_BATCH = 16


@dataclass
class StudyOutcome:
    study: str
    exported_study: str | None = None
    status: str = "pending"  # exported | partial | withheld | not-found | failed
    instances: int = 0
    exported: int = 0
    withheld: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


@dataclass
class ExportReport:
    project: str
    target: str
    studies: list[StudyOutcome] = field(default_factory=list)

    def as_json(self) -> dict:
        total = Counter()
        for s in self.studies:
            total["instances"] += s.instances
            total["exported"] += s.exported
            total["withheld"] += sum(s.withheld.values())
            total["failed"] += s.failed
        return {"project": self.project, "target": self.target, "totals": dict(total),
                "studies": [s.as_json() for s in self.studies]}


@dataclass(frozen=True)
class ExportTarget:
    """A folder (written with a DICOMDIR) or a STOW-RS base URL (``.../studies`` is appended)."""

    folder: Path | None = None
    stow_url: str | None = None
    stow_token: str | None = field(default=None, repr=False)
    #: where the bearer token of a configured STOW-RS target is read from (jobs persist this, never the token)
    stow_token_file: str | None = None

    def __post_init__(self) -> None:
        if (self.folder is None) == (self.stow_url is None):
            raise BadRequest("give exactly one export target: a folder or a STOW-RS URL")

    def describe(self) -> str:
        return f"folder:{self.folder}" if self.folder is not None else f"stow-rs:{self.stow_url}"

    def to_json(self) -> dict:
        if self.folder is not None:
            return {"folder": str(self.folder)}
        return {"stow_url": self.stow_url, "stow_token_file": self.stow_token_file}

    @classmethod
    def from_json(cls, d: dict) -> "ExportTarget":
        if d.get("folder"):
            return cls(folder=Path(d["folder"]))
        return cls(stow_url=d["stow_url"], stow_token_file=d.get("stow_token_file"))

    def token(self) -> str | None:
        if self.stow_token is None and self.stow_token_file:
            return Path(self.stow_token_file).read_text().strip()
        return self.stow_token


class DicomExportService:
    """Runs imaging cohort exports for a requester (see the module docstring)."""

    def __init__(self, dicomweb, policy: DeidPolicy, audit: AuditSink) -> None:
        self.dicomweb = dicomweb
        self.policy = policy
        self.audit = audit

    async def export(self, requester: Requester, studies: list[str], target: ExportTarget, *,
                     project: str | None = None, options: DeidOptions | None = None,
                     progress: Callable[[str, int], None] | None = None) -> ExportReport:
        if not studies:
            raise BadRequest("no studies to export")
        keys = self.policy.keys_for(requester, project)
        options = options or DeidOptions()
        report = ExportReport(keys.project, target.describe())
        staging = Path(tempfile.mkdtemp(prefix="fedgate-export-"))
        sender = _Stow(target) if target.stow_url else None
        try:
            for i, study in enumerate(dict.fromkeys(studies)):
                report.studies.append(await self.export_study(requester, study, keys, options, sender,
                                                              staging / str(i), progress))
            if target.folder is not None:
                await asyncio.to_thread(_write_fileset, staging, target.folder)
        finally:
            if sender is not None:
                await sender.close()
            shutil.rmtree(staging, ignore_errors=True)
        log.info("dicom export done", extra={"studies": len(report.studies), "target": "stow" if sender else "folder"})
        return report

    async def cohort_studies(self, requester: Requester, cohort, *, expand=None) -> list[str]:
        """The studies a federation cohort (the cohort language of ``POST /federation/query``) selects at this
        site for ``requester``: the cohort compiled within the requester's consent scope (the gated cohort
        compiler), then the studies holding permitted instances of its patients.  A malformed cohort is a 400."""
        from gateway.store import cohort_reads
        from gateway.store.cohort import compile_cohort
        from mappings.cohort.language import CohortError, parse

        try:
            root = parse(cohort, "$.cohort")
        except CohortError as exc:
            raise BadRequest(str(exc), expression=[exc.field]) from None
        access = await self.dicomweb.query.access.open(requester)
        async with access.read() as conn:
            try:
                stmt = compile_cohort(root, access.scope, expand=expand)
            except CohortError as exc:
                raise BadRequest(str(exc), expression=[exc.field]) from None
            ids = sorted({r[0] for r in await conn.execute(stmt)})
            studies = await cohort_reads.studies_of(conn, access.scope, ids)
        await self.audit.record(AccessRecord(
            requester, Action.EXECUTE, Interaction.DICOM_EXPORT, "0", (), tuple(ids)[:200], "",
            f"dicom export cohort: {len(ids)} patients, {len(studies)} studies"))
        return studies

    async def export_study(self, requester: Requester, study: str, keys, options: DeidOptions,
                           sender: "_Stow | None", staging: Path,
                           progress: Callable[[str, int], None] | None = None) -> StudyOutcome:
        """One study through the gate, de-identified, sent (STOW-RS) or staged into ``staging`` (a folder
        of its own: a resumed job starts an unfinished study again from an empty one); audited."""
        outcome = StudyOutcome(study)
        try:
            rows = await self.dicomweb.retrieve(requester, study, metadata=False)
        except NotFound:
            outcome.status = "not-found"
            if progress:
                progress(study, 0)
            return outcome
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        outcome.instances = len(rows)
        withheld: Counter[str] = Counter()
        batch: list[bytes] = []
        for row in rows:
            try:
                out = await rows.deidentified(row, keys, options)
            except _UNREADABLE as exc:  # one unreadable instance fails alone, counted
                outcome.failed += 1
                outcome.errors.append(f"instance {row['sop_uid']}: {type(exc).__name__}")
                continue
            if isinstance(out, Withheld):
                withheld[out.reason] += 1
            elif sender is not None:
                batch.append(out)
                if len(batch) >= STOW_BATCH:
                    await self._send(sender, batch, outcome)
                    batch = []
            else:
                await asyncio.to_thread((staging / f"{uuid.uuid4().hex}.dcm").write_bytes, out)
                outcome.exported += 1
            if progress:
                progress(study, 1)
        if batch:
            await self._send(sender, batch, outcome)
        outcome.withheld = dict(withheld)
        outcome.exported_study = keys.uid_for(study)
        outcome.status = ("exported" if outcome.exported == outcome.instances else
                          "withheld" if outcome.exported == 0 and not outcome.failed else
                          "failed" if outcome.exported == 0 else "partial")
        await self.audit.record(AccessRecord(
            requester, Action.EXECUTE, Interaction.DICOM_EXPORT, "0" if outcome.status == "exported" else "4",
            (f"ImagingStudy/{study}",), tuple(sorted({r["patient_id"] for r in rows if r.get("patient_id")}))[:200],
            "", f"dicom export {outcome.status}: {outcome.exported}/{outcome.instances} to project {keys.project}",
        ))
        return outcome

    @staticmethod
    async def _send(sender: "_Stow", batch: list[bytes], outcome: StudyOutcome) -> None:
        ok, error = await sender.send(batch)
        outcome.exported += ok
        outcome.failed += len(batch) - ok
        if error:
            outcome.errors.append(error)


class DicomExportJobs:
    """Export jobs started over HTTP (``POST /export/dicom``): persisted rows (gateway.store.export_schema)
    claimed with leases (:class:`~gateway.store.leases.LeasedQueue`, as the bulk ``$export`` jobs) by the
    worker every serving process runs.  After every study the job's cursor (the outcomes so far) is stored, and
    a folder export stages each study's files under ``data_dir/exports/.staging/<job>/<n>``, so a job whose
    server died resumes at its first unfinished study, in another process or after a restart (that study is
    done again from the start; a STOW-RS target receives its instances again, which STOW-RS allows)."""

    def __init__(self, db, service: DicomExportService, data_dir: Path, *, lease_s: float = 60.0,
                 poll_s: float = 1.0) -> None:
        from gateway.store.export_schema import dicom_export_job
        from gateway.store.leases import LeasedQueue

        self.db = db
        self.service = service
        self.staging_root = Path(data_dir) / "exports" / ".staging"
        self.worker_id = uuid.uuid4().hex
        self.poll_s = poll_s
        self.queue = LeasedQueue(db, dicom_export_job, "job_id", self.worker_id, lease_s)
        self._wake = asyncio.Event()

    async def start(self, requester: Requester, studies: list[str], target: ExportTarget, *, project: str | None,
                    options: DeidOptions, request_doc: dict) -> str:
        import dataclasses
        import time

        import orjson

        from gateway.services.bulk import _purpose_json, _requester_json
        from gateway.store import export_schema

        job_id = uuid.uuid4().hex
        now = time.time()
        opts = {k: v for k, v in dataclasses.asdict(options).items() if k != "safe_private"}
        await export_schema.create_job(self.db, {
            "job_id": job_id, "subject": requester.subject, "state": "queued",
            "request": orjson.dumps(request_doc).decode(), "done": 0, "total": len(dict.fromkeys(studies)),
            "created_ts": now, "updated_ts": now, "not_before": now, "attempts": 0,
            "requester": _requester_json(requester), "purpose": _purpose_json(requester.purpose),
            "studies": orjson.dumps(list(dict.fromkeys(studies))).decode(),
            "target": orjson.dumps(target.to_json()).decode(), "project": project,
            "options": orjson.dumps(opts).decode()})
        self._wake.set()
        return job_id

    async def worker(self) -> None:
        await poll_worker("dicom export", self.run_once, self._wake, lambda: self.poll_s)

    async def run_once(self) -> bool:
        import orjson

        row = await self.queue.claim()
        if row is None:
            return False
        hb = asyncio.create_task(self.queue.heartbeat(row.job_id))
        try:
            report = await self.execute(row)
        except _JobGone:
            pass
        except asyncio.CancelledError:
            # graceful shutdown: hand the job back at once (its cursor stays: the next run resumes)
            await asyncio.shield(self.queue.finish(row.job_id, state="queued", lease_owner=None, lease_until=None))
            raise
        except (GatewayError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("dicom export job failed", extra={"error_type": type(exc).__name__})
            await self.queue.finish(row.job_id, state="failed", error=type(exc).__name__, lease_owner=None,
                                    lease_until=None)
            shutil.rmtree(self.staging_root / row.job_id, ignore_errors=True)
        else:
            await self.queue.finish(row.job_id, state="completed", done=len(report.studies),
                                    report=orjson.dumps(report.as_json()).decode(), lease_owner=None,
                                    lease_until=None)
            shutil.rmtree(self.staging_root / row.job_id, ignore_errors=True)
        finally:
            hb.cancel()
        return True

    async def execute(self, row) -> ExportReport:
        import orjson

        from gateway.services.bulk import _job_requester

        requester = _job_requester(row)
        studies = orjson.loads(row.studies)
        target = ExportTarget.from_json(orjson.loads(row.target))
        options = DeidOptions(**orjson.loads(row.options or "{}"))
        keys = self.service.policy.keys_for(requester, row.project)
        outcomes = [StudyOutcome(**d) for d in orjson.loads(row.cursor or "[]")]
        staging = self.staging_root / row.job_id
        sender = _Stow(target) if target.stow_url else None
        try:
            for i in range(len(outcomes), len(studies)):
                outcomes.append(await self.service.export_study(requester, studies[i], keys, options, sender,
                                                                staging / str(i)))
                cursor = orjson.dumps([o.as_json() for o in outcomes]).decode()
                if not await self.queue.update(row.job_id, cursor=cursor, done=len(outcomes)):
                    raise _JobGone(row.job_id)
            if target.folder is not None:
                await asyncio.to_thread(_write_fileset, staging, target.folder)
        finally:
            if sender is not None:
                await sender.close()
        return ExportReport(keys.project, target.describe(), outcomes)

    async def get(self, job_id: str) -> dict | None:
        from gateway.store import export_schema

        return await export_schema.get_job(self.db, job_id)


class _JobGone(Exception):
    """The job's lease was taken over (this worker stalled past it) or the job is gone."""


def _write_fileset(staging: Path, folder: Path) -> None:
    """The staged instances as a File-set with a DICOMDIR in ``folder`` (pydicom.fileset)."""
    from pydicom.fileset import FileSet

    files = sorted(staging.rglob("*.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    if not files:
        return
    import hashlib

    import pydicom

    fs = FileSet()
    for f in files:
        ds = pydicom.dcmread(f)
        # the DICOMDIR STUDY/SERIES/IMAGE records need these (PS3.3 §F.5, Type 1): the profile emptied or
        # never had them; dummies derived from the already pseudonymous UIDs keep instances of a study together
        if not str(ds.get("StudyID", "") or "").strip():
            ds.StudyID = hashlib.sha256(str(ds.StudyInstanceUID).encode()).hexdigest()[:16].upper()
        for kw, dummy in (("StudyDate", "19000101"), ("StudyTime", "000000"), ("SeriesNumber", 1), ("InstanceNumber", 1)):
            if ds.get(kw) in (None, ""):
                setattr(ds, kw, dummy)
        fs.add(ds)
    fs.write(folder)


class _Stow:
    """STOW-RS client (PS3.18 §10.5): one multipart/related request per batch; counts what the server
    stored from its response (FailedSOPSequence items are failures)."""

    def __init__(self, target: ExportTarget) -> None:
        import aiohttp

        self.url = target.stow_url.rstrip("/") + "/studies"
        headers = {"Accept": "application/dicom+json"}
        token = target.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=300))

    async def send(self, parts: list[bytes]) -> tuple[int, str | None]:
        import aiohttp

        boundary = uuid.uuid4().hex
        body = bytearray()
        for p in parts:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            async with self.session.post(self.url, data=bytes(body), headers={"Content-Type": ctype}) as resp:
                text = await resp.read()
                if resp.status not in (200, 202, 409):
                    return 0, f"STOW-RS answered HTTP {resp.status}"
                failed = 0
                if text:
                    import orjson

                    try:
                        doc = orjson.loads(text)
                        failed = len(((doc.get("00081198") or {}).get("Value")) or [])
                    except (orjson.JSONDecodeError, AttributeError):
                        failed = 0 if resp.status == 200 else len(parts)
                return len(parts) - failed, (f"STOW-RS refused {failed} instance(s)" if failed else None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return 0, f"STOW-RS request failed ({type(exc).__name__})"

    async def close(self) -> None:
        await self.session.close()


__all__ = ["DicomExportJobs", "DicomExportService", "ExportReport", "ExportTarget", "StudyOutcome"]
