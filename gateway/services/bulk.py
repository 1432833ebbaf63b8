"""FHIR Bulk Data export (Bulk Data Access IG v2.0.0, "Export"; issue 24): persisted, leased ``$export`` jobs.

Flow.  Kick-off (``[base]/$export``, ``Patient/$export``, ``Group/[id]/$export``) checks the parameters
(:mod:`mappings.fhir.bulk`), asks the gate for the requester's access (a refusal is a 403 now, not a failed
job later) and stores a job.  A worker — every serving process runs one; jobs are claimed with leases
(:class:`~gateway.store.leases.LeasedQueue`, the inference job scheme) — runs it: for each resource type,
pages of the **FHIR search path** (:func:`gateway.store.fhir_repo.search` with the requester's
:class:`~gateway.store.access.Access` scope, opened again for every run so a consent withdrawn since the
kick-off counts) in storage order (keyset on the row number), written to one NDJSON file per type, each
page's patients audited.  After every page the job's cursor (type, last row, file length) is stored, so a
job whose server died resumes where it stopped, in another process or after a restart.  Research roles
configured for de-identification (``[export] deidentify_roles``) get the copies of
:func:`mappings.deid.fhir.deidentify_resource` for the project's keys instead (made in the worker pool).

Content = exactly what the requester could search: the same WHERE clause as ``GET [base]/[type]``, plus
``_lastUpdated <= transactionTime`` (IG: nothing modified after the transaction time), ``_since`` and the
``_typeFilter`` criteria.  Files are served only to the requester who started the job (same subject and
roles), expire after ``[export] expire_s`` and are removed with their job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import delete, func, select

from gateway.context import Purpose, Requester
from gateway.errors import BadRequest, Forbidden, GatewayError, NotFound
from gateway.services.access import Action, Interaction, Outcome
from gateway.store import fhir_repo as repo
from gateway.store.access import AccessLayer
from gateway.store.bulk_schema import bulk_job
from gateway.store.db import Database
from gateway.store.leases import LeasedQueue, poll_worker
from mappings.dates import now_instant
from mappings.fhir.bulk import ExportRequest, KickoffError, ndjson_page, parse_kickoff
from mappings.fhir.compartment import PATIENT_COMPARTMENT
from mappings.fhir.search import SearchError, parse_search
from mappings.fhir.validate import known_type

log = logging.getLogger(__name__)

LEVELS = ("system", "patient", "group")
#: Types never exported: the audit trail is served from its own store (docs/audit.md)
NOT_EXPORTED = frozenset({"AuditEvent"})


@dataclass(frozen=True)
class ExportConfig:
    """``[export]`` site settings (docs/bulk-export.md)."""

    poll_s: float = 1.0
    lease_s: float = 60.0
    page_size: int = 1000
    expire_s: float = 24 * 3600.0
    retry_after_s: int = 2
    max_active: int = 4  # queued + running jobs per requester (more: 429)
    #: roles whose exports are de-identified (a role listed here gets de-identified copies, whatever else it has)
    deidentify_roles: frozenset[str] = frozenset({"analyst"})
    #: the project whose keys de-identify (pseudonyms, date offsets) when the requester's token names none
    project: str = ""
    worker: bool = True

    @classmethod
    def from_extra(cls, d: dict[str, Any]) -> "ExportConfig":
        kw: dict[str, Any] = {}
        for f in ("poll_s", "lease_s", "expire_s"):
            if f in d:
                kw[f] = float(d[f])
        for f in ("page_size", "retry_after_s", "max_active"):
            if f in d:
                kw[f] = int(d[f])
        if "deidentify_roles" in d:
            roles = d["deidentify_roles"]
            kw["deidentify_roles"] = frozenset([roles] if isinstance(roles, str) else roles or ())
        if d.get("project"):
            kw["project"] = str(d["project"])
        if "worker" in d:
            kw["worker"] = bool(d["worker"])
        if kw.get("page_size", 1) < 1:
            raise ValueError("[export] page_size must be at least 1")
        return cls(**kw)


class JobGone(Exception):
    """The job was cancelled (deleted) or its lease taken over while this worker ran it."""


def _requester_json(r: Requester) -> str:
    return orjson.dumps({"subject": r.subject, "roles": sorted(r.roles), "organization": r.organization,
                         "attributes": dict(r.attributes), "read_only": r.read_only,
                         "resource_types": sorted(r.resource_types) if r.resource_types is not None else None,
                         "patient": r.patient}).decode()


def _purpose_json(p: Purpose) -> str:
    return orjson.dumps({"kind": p.kind, "codes": list(p.codes), "diseases": list(p.diseases)}).decode()


def _job_requester(row) -> Requester:
    r = orjson.loads(row.requester)
    p = orjson.loads(row.purpose)
    types = r.get("resource_types")
    return Requester(r["subject"], frozenset(r["roles"]), r.get("organization"), r.get("attributes") or {},
                     Purpose(p["kind"], tuple(p["codes"]), tuple(p["diseases"])), None, bool(r.get("read_only")),
                     frozenset(types) if types is not None else None, r.get("patient"))


def _owner(r: Requester) -> tuple[str, tuple[str, ...]]:
    return r.subject, tuple(sorted(r.roles))


@dataclass(frozen=True)
class Status:
    """What the status endpoint answers: ``state`` and, when completed, the manifest (relative file names)."""

    state: str
    progress: str = ""
    manifest: dict[str, Any] | None = None
    error: str | None = None
    expires_ts: float | None = None


class BulkExportService:
    def __init__(self, db: Database, access: AccessLayer, data_dir: Path, config: ExportConfig, *,
                 deid_secret: bytes = b"", site_id: str = "site-local", workers=None, policy=None) -> None:
        self.db, self.access, self.config = db, access, config
        self.root = Path(data_dir) / "bulk"
        self.worker_id = uuid.uuid4().hex
        self.queue = LeasedQueue(db, bulk_job, "job_id", self.worker_id, config.lease_s)
        self._secret = deid_secret
        self._site_id = site_id
        self._workers = workers  # gateway.services.workers.WorkerPool: de-identification off the event loop
        #: the site's identified|deidentified policy (``deidentifies(requester)``, ``project_for(requester)``);
        #: None: ``[export] deidentify_roles`` and ``project`` of :class:`ExportConfig`
        self._policy = policy
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------------------------- kick-off
    def deidentifies(self, requester: Requester) -> bool:
        if self._policy is not None:
            return bool(self._policy.deidentifies(requester))
        return bool(requester.roles & self.config.deidentify_roles)

    def project_of(self, requester: Requester) -> str:
        if self._policy is not None:
            return str(self._policy.project_for(requester))
        attr = requester.attributes.get("project") if isinstance(requester.attributes, dict) else None
        return str(attr or self.config.project or self._site_id)

    async def kickoff(self, requester: Requester, level: str, group_id: str | None, pairs: list[tuple[str, str]],
                      request_url: str, *, respond_async: bool = True, lenient: bool = False,
                      bad_body: GatewayError | None = None) -> tuple[str, ExportRequest]:
        """Check and persist a kick-off (IG "Bulk Data Kick-off Request"); returns the job id.  ``bad_body``: the
        handler's error parsing a POST body, raised once the gate has decided."""
        if level not in LEVELS:
            raise ValueError(level)
        access = await self.access.open(requester)  # the gate decides first: a refused purpose is a 403 here
        if bad_body is not None:
            raise bad_body
        if not respond_async:
            raise BadRequest("$export is asynchronous: send the header 'Prefer: respond-async' (Bulk Data IG)",
                             expression=["Prefer"])
        try:
            req = parse_kickoff(pairs, lenient=lenient)
        except KickoffError as exc:
            raise BadRequest(str(exc), expression=[exc.param]) from None
        self._check_request(requester, level, req)
        if level == "group":  # a Group the requester may not see is not known (read through the gate)
            async with access.read() as conn:
                st = await repo.get_visible(conn, access.scope, "Group", group_id or "")
            if st is None or st.deleted:
                await access.record(Action.EXECUTE, Interaction.OPERATION, Outcome.MINOR_FAILURE,
                                    resources=(f"Group/{group_id}",), detail="$export: group not found or not permitted")
                raise NotFound(f"Group/{group_id} is not known")
        if self.deidentifies(requester) and not self._secret:
            raise GatewayError("de-identified exports need the site's de-identification secret (deid_secret)",
                               status=503, issue_code="exception")
        now = time.time()
        async with self.db.write() as conn:
            active = (await conn.execute(select(func.count()).select_from(bulk_job).where(
                bulk_job.c.state.in_(("queued", "running")), bulk_job.c.owner == requester.subject))).scalar_one()
            if active >= self.config.max_active:
                raise GatewayError(f"{active} exports of this requester are still running (at most "
                                   f"{self.config.max_active}); retry later", status=429, issue_code="throttled",
                                   headers={"Retry-After": str(self.config.retry_after_s * 10)})
            job_id = uuid.uuid4().hex
            instant, ts = now_instant()
            await conn.execute(bulk_job.insert().values(
                job_id=job_id, owner=requester.subject, level=level, group_id=group_id, request=request_url, params=req.to_json(),
                requester=_requester_json(requester), purpose=_purpose_json(requester.purpose),
                deidentify=int(self.deidentifies(requester)), state="queued", attempts=0, not_before=now,
                transaction_time=instant, transaction_ts=ts, created_ts=now, updated_ts=now,
                progress=orjson.dumps({"written": 0}).decode()))
        await access.record(Action.EXECUTE, Interaction.OPERATION, Outcome.SUCCESS,
                            detail=f"$export kick-off ({level}) job {job_id}")
        self._wake.set()
        return job_id, req

    def _check_request(self, requester: Requester, level: str, req: ExportRequest) -> None:
        if req.patients and level == "system":
            raise BadRequest("$export parameter 'patient': not applicable to a system-level export (Bulk Data IG; "
                             "use Patient/$export or Group/[id]/$export)", expression=["patient"])
        for t in list(req.types) + list(req.type_filters):
            if not known_type(t) or t in NOT_EXPORTED:
                raise BadRequest(f"$export parameter '_type': {t!r} is not an exportable FHIR R4 resource type",
                                 expression=["_type"])
            if level != "system" and t not in PATIENT_COMPARTMENT and t != "Patient":
                raise BadRequest(f"$export parameter '_type': {t} is not in the Patient compartment "
                                 f"({level}-level export)", expression=["_type"])
            if requester.resource_types is not None and t not in requester.resource_types:
                raise Forbidden(f"the token's scopes do not grant reading {t}")
        for t, queries in req.type_filters.items():
            for q in queries:
                try:
                    parse_search(t, list(q), default_count=1, max_count=1)
                except SearchError as exc:
                    raise BadRequest(f"$export parameter '_typeFilter': {exc}", expression=["_typeFilter"]) from None

    # --------------------------------------------------------------------------------------- status
    async def _own_row(self, requester: Requester, job_id: str):
        async with self.db.read() as conn:
            row = (await conn.execute(select(bulk_job).where(bulk_job.c.job_id == job_id))).first()
        if row is None or _owner(_job_requester(row)) != _owner(requester):
            raise NotFound(f"export job {job_id[:64]!r} is not known")  # another requester's job: as absent
        return row

    async def status(self, requester: Requester, job_id: str) -> Status:
        row = await self._own_row(requester, job_id)
        progress = orjson.loads(row.progress or "{}")
        if row.state in ("queued", "running"):
            current = progress.get("type")
            text = f"{progress.get('written', 0)} resources written" + (f", exporting {current}" if current else "")
            if progress.get("types"):
                text += f" (type {progress.get('index', 0) + 1} of {progress['types']})"
            return Status(row.state, text)
        if row.state == "failed":
            return Status("failed", error=row.error or "export failed", expires_ts=row.expires_ts)
        output = orjson.loads(row.output or "[]")
        manifest = {
            "transactionTime": row.transaction_time, "request": row.request, "requiresAccessToken": True,
            "output": output, "error": progress.get("error", []),
        }
        if row.deidentify:
            manifest["extension"] = {"https://fedgate.dev/fhir/bulk/deidentified": True,
                                     "https://fedgate.dev/fhir/bulk/withheld": progress.get("withheld", 0)}
        return Status("completed", manifest=manifest, expires_ts=row.expires_ts)

    async def file(self, requester: Requester, job_id: str, name: str) -> Path:
        """The path of one output file of a completed job the requester started (IG "File Request")."""
        access = await self.access.open(requester)  # a requester the gate refuses now gets no file
        row = await self._own_row(requester, job_id)
        names = {Path(o["url"]).name for o in orjson.loads(row.output or "[]")
                 + orjson.loads(row.progress or "{}").get("error", [])}
        if row.state != "completed" or name not in names:
            raise NotFound(f"export file {name[:80]!r} is not known")
        path = self.root / job_id / name
        if not path.is_file():
            raise NotFound(f"export file {name[:80]!r} is not known")
        await access.record(Action.READ, Interaction.OPERATION, Outcome.SUCCESS,
                            detail=f"$export file {name} of job {job_id}")
        return path

    async def cancel(self, requester: Requester, job_id: str) -> None:
        """IG "Delete a Bulk Data Request": the job stops, its files and row are removed."""
        await self._own_row(requester, job_id)
        async with self.db.write() as conn:
            await conn.execute(delete(bulk_job).where(bulk_job.c.job_id == job_id))
        await asyncio.to_thread(shutil.rmtree, self.root / job_id, True)
        access = await self.access.open(requester)
        await access.record(Action.DELETE, Interaction.OPERATION, Outcome.SUCCESS,
                            detail=f"$export job {job_id} cancelled")

    # --------------------------------------------------------------------------------------- worker
    #: how often the worker sweeps expired exports
    SWEEP_S = 30.0

    async def worker(self) -> None:
        swept = [0.0]

        async def sweep() -> None:
            if time.monotonic() - swept[0] > self.SWEEP_S:
                swept[0] = time.monotonic()
                await self.expire()

        await poll_worker("export", self.run_once, self._wake, lambda: self.config.poll_s, sweep)

    async def expire(self) -> int:
        """Remove expired jobs and their files (and folders no job owns any more)."""
        now = time.time()
        async with self.db.read() as conn:
            gone = [r.job_id for r in await conn.execute(select(bulk_job.c.job_id).where(
                bulk_job.c.expires_ts.is_not(None), bulk_job.c.expires_ts < now))]
        if gone:
            async with self.db.write() as conn:
                await conn.execute(delete(bulk_job).where(bulk_job.c.job_id.in_(gone), bulk_job.c.expires_ts < now))
        async with self.db.read() as conn:
            known = {r.job_id for r in await conn.execute(select(bulk_job.c.job_id))}
        stale = [p for p in (self.root.iterdir() if self.root.is_dir() else ())
                 if p.name not in known and now - p.stat().st_mtime > self.config.lease_s]
        for p in [self.root / j for j in gone] + stale:
            await asyncio.to_thread(shutil.rmtree, p, True)
        return len(gone)

    async def run_once(self) -> bool:
        row = await self.queue.claim()
        if row is None:
            return False
        hb = asyncio.create_task(self.queue.heartbeat(row.job_id))
        try:
            output, progress = await self.execute(row)
        except JobGone:
            await asyncio.to_thread(shutil.rmtree, self.root / row.job_id, True)
        except asyncio.CancelledError:
            # graceful shutdown: hand the job back at once (its cursor stays: the next run resumes)
            await asyncio.shield(self.queue.finish(row.job_id, state="queued", lease_owner=None, lease_until=None))
            raise
        except (GatewayError, OSError, ValueError, KeyError, TypeError) as e:
            log.warning("export job failed", extra={"job": row.job_id, "error": type(e).__name__})
            msg = e.message if isinstance(e, GatewayError) else f"export failed ({type(e).__name__})"
            await self.queue.finish(row.job_id, state="failed", error=msg[:2000], lease_owner=None,
                                    lease_until=None, expires_ts=time.time() + self.config.expire_s)
            await asyncio.to_thread(shutil.rmtree, self.root / row.job_id, True)
        else:
            done = await self.queue.finish(row.job_id, state="completed", output=orjson.dumps(output).decode(),
                                           progress=orjson.dumps(progress).decode(), lease_owner=None,
                                           lease_until=None, expires_ts=time.time() + self.config.expire_s)
            if not done:  # cancelled at the last moment
                await asyncio.to_thread(shutil.rmtree, self.root / row.job_id, True)
        finally:
            hb.cancel()
        return True

    def _plan(self, row, req: ExportRequest) -> list[str]:
        if req.types:
            return list(req.types)
        if row.level != "system":
            return ["Patient"] + [t for t in PATIENT_COMPARTMENT if t != "Patient" and t not in NOT_EXPORTED]
        return []  # every type the requester can see: asked from the store at the first run

    async def _members(self, requester: Requester, group_id: str) -> tuple[str, ...]:
        """The Patient members of a Group, read through the gate (a Group the requester may not see is a
        failed job, like a 404 on a read)."""
        access = await self.access.open(requester)
        async with access.read() as conn:
            st = await repo.get_visible(conn, access.scope, "Group", group_id)
        if st is None or st.deleted:
            raise NotFound(f"Group/{group_id} is not known")
        members = []
        for m in st.resource().get("member") or ():
            ref = ((m or {}).get("entity") or {}).get("reference") or ""
            rtype, _, rid = ref.rpartition("/")
            if rtype.rpartition("/")[2] == "Patient" and rid:
                members.append(rid)
        return tuple(sorted(set(members)))

    async def execute(self, row) -> tuple[list[dict], dict]:
        requester = _job_requester(row)
        req = ExportRequest.from_json(row.params)
        access = await self.access.open(requester)  # again at every run: consent as it is now
        cursor = orjson.loads(row.cursor) if row.cursor else {}
        progress = orjson.loads(row.progress or "{}")
        types = cursor.get("plan") or self._plan(row, req)
        if not types:
            async with access.read() as conn:
                types = [t for t in await repo.visible_types(conn, access.scope) if t not in NOT_EXPORTED]
            if requester.resource_types is not None:
                types = [t for t in types if t in requester.resource_types]
        compartment: str | tuple[str, ...] | None = None
        if row.level == "group":
            compartment = await self._members(requester, row.group_id)
            if not compartment:
                types = []
        project = self.project_of(requester) if row.deidentify else None
        folder = self.root / row.job_id
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        errors: list[dict] = []
        if req.patients:  # IG "patient": only these compartments; unknown ones reported in an error file
            compartment, errors = await self._patients(access, row, req.patients, compartment, folder)
            if not compartment:
                types = []
        output: list[dict] = cursor.get("output", [])
        index = cursor.get("index", 0)
        after = cursor.get("after", 0)
        fno = cursor.get("filter", 0)
        size = cursor.get("bytes", 0)
        written = progress.get("written", 0)
        withheld = progress.get("withheld", 0)
        count = cursor.get("count", 0)
        while index < len(types):
            rtype = types[index]
            path = folder / f"{rtype}.ndjson"
            await asyncio.to_thread(_truncate, path, size)  # a resumed run drops a page written after the cursor
            filters = req.type_filters.get(rtype) or ((),)
            seen: set[int] | None = set() if len(filters) > 1 else None  # OR of several filters: no duplicates
            while fno < len(filters):
                base = list(filters[fno]) + [("_lastUpdated", f"le{row.transaction_time}")]
                if req.since:
                    base.append(("_lastUpdated", f"gt{req.since}"))
                # pipelined: the next page is read while the previous one is de-identified (worker pool)
                pending: tuple[asyncio.Task, list, int] | None = None
                nxt = None
                try:
                    while True:
                        q = parse_search(rtype, base, default_count=self.config.page_size,
                                         max_count=self.config.page_size)
                        q.count, q.total, q.compartment = self.config.page_size, "none", compartment
                        q.storage_order = True
                        last = pending[2] if pending else after  # keyset paging in storage (rid) order
                        q.after = (last,) if last is not None else None
                        async with access.read() as conn:
                            page = (await repo.search(conn, q, access.scope)).matches
                        nxt = None
                        if page:
                            rows = page if seen is None else [p for p in page if p.rid not in seen]
                            if seen is not None:
                                seen.update(p.rid for p in page)
                            nxt = (asyncio.ensure_future(self._lines([p.content for p in rows], project, req.elements)), rows,
                                   page[-1].rid)
                        if pending is not None:
                            task, prows, after = pending
                            pending = None
                            data, held = await task
                            size, n = await self._write_page(access, row.job_id, rtype, path, prows, data, held, size)
                            count, written, withheld = count + n, written + n, withheld + held
                            await self._save(row.job_id, types, index, fno, after, size, count, output, written,
                                             withheld)
                        pending = nxt
                        if pending is None:
                            break
                finally:
                    for item in (pending, nxt):
                        if item is not None and not item[0].done():
                            item[0].cancel()
                fno, after = fno + 1, 0
                if fno < len(filters):
                    await self._save(row.job_id, types, index, fno, after, size, count, output, written, withheld)
            if count:
                output.append({"type": rtype, "url": path.name, "count": count})
            elif path.exists():
                await asyncio.to_thread(path.unlink)
            index, fno, after, size, count = index + 1, 0, 0, 0, 0
            await self._save(row.job_id, types, index, fno, after, size, count, output, written, withheld)
        return output, {"written": written, "withheld": withheld, "error": errors}

    async def _patients(self, access, row, patients: tuple[str, ...], members, folder: Path):
        """(the requested patients the export covers, the manifest's error[]): a patient the requester may not
        read, that is not stored, or (Group level) not a member is left out and reported in an
        ``OperationOutcome`` NDJSON file (IG: "patient" parameter)."""
        present, missing = [], []
        async with access.read() as conn:
            for pid in patients:
                st = await repo.get_visible(conn, access.scope, "Patient", pid)
                ok = st is not None and not st.deleted and (members is None or pid in members)
                (present if ok else missing).append(pid)
        path = folder / "OperationOutcome.ndjson"
        if not missing:
            if path.exists():
                await asyncio.to_thread(path.unlink)
            return tuple(present), []
        where = " or is not a member of the group" if row.level == "group" else ""
        lines = b"".join(orjson.dumps({"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "not-found",
            "diagnostics": f"patient Patient/{pid} is not known{where}: not exported"}]}) + b"\n" for pid in missing)
        await asyncio.to_thread(path.write_bytes, lines)
        return tuple(present), [{"type": "OperationOutcome", "url": path.name, "count": len(missing)}]

    async def _write_page(self, access, job_id: str, rtype: str, path: Path, rows: list, data: bytes, held: int,
                          size: int) -> tuple[int, int]:
        """Append one page's NDJSON and audit its patients; returns (file size, resources written)."""
        if data:
            await asyncio.to_thread(_append, path, data)
            size += len(data)
        patients = sorted({p.patient_id for p in rows if p.patient_id})
        for i in range(0, max(len(patients), 1), 200):  # an audit record holds 200 patients: every one recorded
            await access.record(Action.READ, Interaction.OPERATION, Outcome.SUCCESS, patients=patients[i:i + 200],
                                resources=[f"{rtype}/{p.res_id}" for p in rows][:200] if i == 0 else (),
                                detail=f"$export job {job_id}: {len(rows)} {rtype}")
        return size, len(rows) - held

    async def _lines(self, contents: list[str], project: str | None, elements: tuple[str, ...] = ()) -> tuple[bytes, int]:
        """One page as NDJSON (de-identified for a project: in the worker pool, split over its processes;
        subsetted as ``_elements`` asks)."""
        if (project is None and not elements) or not contents:
            return ndjson_page(contents)
        if self._workers is None:
            return await asyncio.to_thread(ndjson_page, contents, project, self._secret, elements)
        parts = max(1, self._workers.workers)
        step = -(-len(contents) // parts)
        done = await asyncio.gather(*(self._workers.run(ndjson_page, contents[i:i + step], project, self._secret,
                                                        elements)
                                      for i in range(0, len(contents), step)))
        return b"".join(d for d, _ in done), sum(h for _, h in done)

    async def _save(self, job_id: str, types: list[str], index: int, fno: int, after: int, size: int, count: int,
                    output: list[dict], written: int, withheld: int) -> None:
        cursor = {"plan": types, "index": index, "filter": fno, "after": after, "bytes": size, "count": count,
                  "output": output}
        progress = {"written": written, "withheld": withheld, "types": len(types), "index": index,
                    "type": types[index] if index < len(types) else None}
        if not await self.queue.update(job_id, cursor=orjson.dumps(cursor).decode(),
                                       progress=orjson.dumps(progress).decode()):
            raise JobGone(job_id)


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size != size:
        with open(path, "r+b") as fh:
            fh.truncate(size)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


__all__ = ["BulkExportService", "ExportConfig", "Status"]
