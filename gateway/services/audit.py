"""Audit sink: every data access becomes a FHIR R4 AuditEvent, hash-chained.

* :class:`ChainedAudit` implements :class:`gateway.services.access.AuditSink`.  ``record`` only
  appends to an in-memory batch (cheap on the request path); a background flusher writes batches in
  one transaction, chaining ``hash = sha256(prev_hash + canonical JSON)``.  On PostgreSQL the chain
  head is serialised with a transaction-scoped advisory lock, so several processes may share a store.
  ``flush()`` is awaited before audit searches and at shutdown, so nothing recorded is lost on a
  clean stop.
* Rows carry a gap-free ``seq`` (1, 2, 3, ... assigned under the chain-head lock), and after every flush the
  new chain head is anchored *outside* the database: :class:`CheckpointLog` appends an HMAC-signed
  ``(seq, hash)`` line to an append-only file (default ``data_dir/audit/checkpoints.jsonl``, key in
  ``data_dir/secrets/audit-checkpoint.key``; the ``[audit]`` settings section can move both).
* :func:`verify` walks the chain and names the first row whose hash, link, sequence number or search
  columns do not match, then checks every checkpoint against it: a chain shorter than a checkpoint was
  truncated, a checkpoint whose hash differs from the row's was re-chained (``fedgate audit verify``).
  Threat model: docs/audit.md.
* :func:`admin_search` and :func:`admin_read` serve ``GET /fhir/AuditEvent`` and ``GET /fhir/AuditEvent/{id}``
  (admins only); the SQL is in :mod:`gateway.store.audit_repo`.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from gateway import keys
from gateway.services.access import AccessRecord
from gateway.services.audit_codes import Action, Interaction, Outcome
from gateway.settings import secret_file
from gateway.store import audit_repo
from gateway.store.audit_repo import ADVISORY_KEY, AuditCriteria
from gateway.store.audit_schema import GENESIS

log = logging.getLogger(__name__)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = "http://hl7.org/fhir/restful-interaction"
DUO_SYSTEM = "http://purl.obolibrary.org/obo/duo"
V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev: str, content: str) -> str:
    return hashlib.sha256((prev + content).encode()).hexdigest()


def to_audit_event(rec: AccessRecord, site: str, recorded: str) -> dict[str, Any]:
    """FHIR R4 AuditEvent (§6.4) for one access, PHI-free (references only)."""
    who = rec.requester
    purpose = who.purpose
    if purpose.is_treatment:
        pov = [{"coding": [{"system": V3_ACT_REASON, "code": "TREAT", "display": "treatment"}]}]
    else:
        pov = [{"coding": [{"system": DUO_SYSTEM, "code": c} for c in purpose.codes]
                + [{"code": d} for d in purpose.diseases], "text": "research"}]
    agent: dict[str, Any] = {
        "who": {"identifier": {"value": who.subject}},
        "requestor": True,
        "role": [{"coding": [{"system": "https://fedgate.dev/roles", "code": r}]} for r in sorted(who.roles)],
    }
    if who.organization:
        agent["who"]["display"] = who.organization
    # typed codes: an action or outcome outside the FHIR value sets raises here (a programming error); an
    # interaction code not in the enum is recorded as "operation" (an access is never left unaudited), the
    # code kept in outcomeDesc, and logged as a warning
    action, outcome = Action(rec.action), Outcome(rec.outcome)
    try:
        interaction = Interaction(rec.interaction)
        unknown = ""
    except ValueError:
        interaction, unknown = Interaction.OPERATION, f"interaction {str(rec.interaction)[:40]!r} is not an audit code"
        log.warning("unknown audit interaction code recorded as 'operation'")
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": DCM, "code": "110110", "display": "Patient Record"},
        "subtype": [{"system": REST, "code": interaction.value}],
        "action": action.value,
        "recorded": recorded,
        "outcome": outcome.value,
        "purposeOfEvent": pov,
        "agent": [agent],
        "source": {"site": site, "observer": {"display": site}},
        "entity": [{"what": {"reference": r}} for r in rec.resources]
        + [{"what": {"reference": f"Patient/{p}"}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"}}
           for p in rec.patients],
    }
    desc = "; ".join(x for x in (rec.scope_summary and f"consent: {rec.scope_summary}", rec.detail, unknown) if x)
    if desc:
        event["outcomeDesc"] = desc
    if rec.path:
        event["source"]["type"] = [{"code": rec.path}]
    return event


def _row(event: dict[str, Any], rec_patients: tuple[str, ...]) -> dict[str, Any]:
    who = event["agent"][0]["who"]["identifier"]["value"]
    return {
        "recorded": event["recorded"], "subject": who, "action": event["action"],
        "interaction": event["subtype"][0]["code"], "outcome": event["outcome"],
        "patients": " " + " ".join(_printable(p) for p in rec_patients) + " " if rec_patients else None,
    }


def _printable(value: str) -> str:
    """A patient id as asked for (a refused request may name "a\x00"), its control characters written as
    \\uXXXX: the same column text on both engines (PostgreSQL cannot store U+0000)."""
    return value if value.isprintable() else "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" for c in value)


class CheckpointLog:
    """Signed chain heads, appended to a file outside the database (the anchor of ``audit verify``).

    One JSON line per checkpoint: ``{"seq", "hash", "at", "mac"}`` with ``mac = HMAC-SHA256(key,
    "seq:hash:at")``.  The file is only ever opened with ``O_APPEND``; several server processes sharing a
    store append to the same file (one ``write`` per line)."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self.key = key

    @classmethod
    def for_settings(cls, settings, *, create: bool = True) -> CheckpointLog | None:
        """The settings' log: ``[audit] checkpoint_file`` / ``key`` (hex or text), defaults under data_dir.
        With ``create`` false (verify), None when no key exists yet."""
        conf = dict(settings.extra.get("audit", {}) or {})
        path = Path(conf.get("checkpoint_file") or settings.data_dir / "audit" / "checkpoints.jsonl")
        key = conf.get("key") or ""
        if key:
            return cls(path, key.encode())
        key_path = Path(conf.get("key_file") or settings.secrets_dir / "audit-checkpoint.key")
        if not key_path.exists() and not create:
            return None
        return cls(path, secret_file(key_path, lambda: secrets.token_hex(32)).encode())

    def mac(self, seq: int, head: str, at: str) -> str:
        return hmac.new(self.key, f"{seq}:{head}:{at}".encode(), hashlib.sha256).hexdigest()

    def append(self, seq: int, head: str) -> None:
        at = datetime.now(UTC).isoformat(timespec="microseconds")
        line = orjson.dumps({"seq": seq, "hash": head, "at": at, "mac": self.mac(seq, head, at)}) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> tuple[dict[int, str], str]:
        """``({seq: hash}, problem)``: the checkpoints, or the first line that is not a valid signed one."""
        heads: dict[int, str] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return heads, ""
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                cp = orjson.loads(line)
                seq, head, at, mac = int(cp["seq"]), str(cp["hash"]), str(cp["at"]), str(cp["mac"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return heads, f"checkpoint file line {n} is not a checkpoint"
            if not hmac.compare_digest(mac, self.mac(seq, head, at)):
                return heads, f"checkpoint file line {n}: signature does not match (forged or altered checkpoint)"
            if heads.get(seq, head) != head:
                return heads, f"checkpoint file line {n}: two different chain heads signed for seq={seq}"
            heads[seq] = head
        return heads, ""


#: The records made while serving the current request (set by the error middleware per request; the handler
#: runs in the middleware's task, so services' ``record`` calls see the same list).  The middleware records a
#: refused request itself unless failures recorded for it already name every resource and patient it named.
_REQUEST_OUTCOMES: contextvars.ContextVar[list[AccessRecord] | None] = contextvars.ContextVar(
    "fedgate_audit_outcomes", default=None)


def begin_request() -> contextvars.Token:
    return _REQUEST_OUTCOMES.set([])


def end_request(token: contextvars.Token) -> None:
    _REQUEST_OUTCOMES.reset(token)


def request_recorded_failure(resources: tuple[str, ...] = (), patients: tuple[str, ...] = ()) -> bool:
    """Whether failures (outcome other than success) were recorded while serving the current request that
    name every one of ``resources`` and ``patients``."""
    failures = [r for r in _REQUEST_OUTCOMES.get() or () if r.outcome != Outcome.SUCCESS]
    if not failures:
        return False
    named_r = {x for r in failures for x in r.resources}
    named_p = {x for r in failures for x in r.patients}
    return set(resources) <= named_r and set(patients) <= named_p


class ChainedAudit:
    """Batched, hash-chained AuditEvent writer."""

    def __init__(self, site: str, *, batch_delay_s: float = 0.05, max_batch: int = 500) -> None:
        self.site = site
        self.db = None
        self._pending: list[tuple[dict, tuple[str, ...]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.batch_delay_s = batch_delay_s
        self.max_batch = max_batch
        self.written = 0
        self.anchor: CheckpointLog | None = None

    @property
    def backlog(self) -> int:
        """Events accepted but not yet written to the chain (the metrics' audit backlog)."""
        return len(self._pending)

    async def record(self, event: AccessRecord) -> None:
        recorded = datetime.now(UTC).isoformat(timespec="microseconds")
        self._pending.append((to_audit_event(event, self.site, recorded), tuple(event.patients)))
        made = _REQUEST_OUTCOMES.get()
        if made is not None:
            made.append(event)
        self._wake.set()
        if self.db is None:  # not started (e.g. a test app without the store ctx): nothing to write to
            return
        if len(self._pending) >= self.max_batch:
            await self.flush()

    async def start(self, db, anchor: CheckpointLog | None = None) -> None:
        self.db = db
        if anchor is not None:
            self.anchor = anchor
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            # never cancel the flusher inside a write: let a flush in progress finish first (cancelled, its
            # transaction would be rolled back at shutdown, and its connection could still be mid-statement)
            async with self._lock:
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.batch_delay_s)
            self._wake.clear()
            try:
                await self.flush()
            except (SQLAlchemyError, OSError) as exc:  # the events stay queued: retried shortly
                log.warning("audit flush failed, will retry: %s", type(exc).__name__)
                self._wake.set()
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending or self.db is None:
                return
            batch, self._pending = self._pending, []
            try:
                head = await self._write(batch)
            except BaseException:
                # not written (a database error, or the request that triggered this flush was cancelled):
                # the events go back to the head of the queue for the next flush — an access is never unaudited
                self._pending[:0] = batch
                raise
            self.written += len(batch)
            if self.anchor is not None:
                try:  # after the commit: a checkpoint never names a head that was rolled back
                    self.anchor.append(*head)
                except OSError as exc:  # the rows are written; the next flush anchors a later head
                    log.warning("audit checkpoint not written: %s", type(exc).__name__)

    async def _write(self, batch: list[tuple[dict, tuple[str, ...]]]) -> tuple[int, str]:
        """Append ``batch`` to the chain; returns the new head ``(seq, hash)``."""
        async with self.db.write() as conn:
            await audit_repo.lock_head(conn)
            seq, prev = await audit_repo.head(conn)
            rows = []
            for event, patients in batch:
                content = canonical(event).decode()
                h = chain_hash(prev, content)
                seq += 1  # gap-free, assigned under the chain-head lock (a sequence would leave gaps on rollback)
                rows.append(_row(event, patients) | {"seq": seq, "content": content, "prev_hash": prev, "hash": h})
                prev = h
            await audit_repo.append(conn, rows)
        return seq, prev


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    rows: int
    problem: str = ""
    seq: int | None = None


async def verify(db, anchor: CheckpointLog | None = None) -> VerifyResult:
    """Walk the chain in ``seq`` order; the first inconsistent row is named.  Then every checkpoint of
    ``anchor`` must name a row of the chain with the same hash (none: the chain is checked on its own,
    and the result says it is not anchored)."""
    heads: dict[int, str] = {}
    if anchor is not None:
        heads, problem = anchor.read()
        if problem:
            return VerifyResult(False, 0, problem)
    prev = GENESIS
    n = 0
    last_seq = 0
    async with db.read() as conn:
        result = await audit_repo.stream_chain(conn)
        try:  # closed also on an early return: an open statement would pin this pooled connection's snapshot
            async for row in result:
                n += 1
                m = row._mapping
                if m["seq"] != last_seq + 1:
                    what = "the first rows of the chain were" if last_seq == 0 else f"rows after seq={last_seq} were"
                    return VerifyResult(False, n, f"row seq={m['seq']}: sequence gap, {what} deleted", m["seq"])
                if m["prev_hash"] != prev:
                    return VerifyResult(False, n, f"row seq={m['seq']}: prev_hash does not link to row before it "
                                                  f"(a row was deleted, inserted or reordered)", m["seq"])
                if chain_hash(prev, m["content"]) != m["hash"]:
                    return VerifyResult(False, n, f"row seq={m['seq']}: content does not match its hash (modified)", m["seq"])
                try:
                    event = orjson.loads(m["content"])
                    expected = _row(event, tuple(e["what"]["reference"].split("/", 1)[1] for e in event.get("entity", ())
                                                 if e.get("type", {}).get("code") == "1"))
                except (orjson.JSONDecodeError, KeyError, IndexError):
                    return VerifyResult(False, n, f"row seq={m['seq']}: content is not an AuditEvent", m["seq"])
                for col, value in expected.items():
                    if m[col] != value:
                        return VerifyResult(False, n, f"row seq={m['seq']}: column {col} does not match the event", m["seq"])
                if heads.get(m["seq"], m["hash"]) != m["hash"]:
                    return VerifyResult(False, n, f"row seq={m['seq']}: hash differs from the signed checkpoint "
                                                  f"(the chain was rewritten and re-chained)", m["seq"])
                prev = m["hash"]
                last_seq = m["seq"]
        finally:
            await result.close()
    if heads and max(heads) > last_seq:
        return VerifyResult(False, n, f"chain ends at seq={last_seq} but a signed checkpoint names seq={max(heads)}: "
                                      f"rows at the tail were deleted", last_seq + 1)
    if n and not heads:  # the gateway anchors every flush: a chain without checkpoints lost its anchor
        why = "no checkpoint key" if anchor is None else f"no signed checkpoint in {anchor.path}"
        return VerifyResult(False, n, f"{n} audit events but {why}: the chain is not anchored (checkpoint file or "
                                      f"key deleted?); deletion of its newest rows could not be detected", None)
    anchored = max(heads) if heads else 0
    tail = f"; {last_seq - anchored} newer than the last checkpoint" if last_seq > anchored else ""
    return VerifyResult(True, n, f"{n} audit events, chain intact (last seq {last_seq}), anchored by "
                                 f"{len(heads)} signed checkpoints (last seq {anchored}){tail}")


def criteria(params: list[tuple[str, str]], *, max_count: int = 1000) -> tuple[AuditCriteria, int]:
    """AuditEvent search parameters → (criteria, page size): agent/subject, patient, date (ge/gt/le/lt/eq
    prefix), outcome, action, subtype, _count; anything else is a 400."""
    from gateway.errors import BadRequest

    found: dict[str, list] = {"subjects": [], "patients": [], "outcomes": [], "actions": [], "interactions": [],
                              "dates": []}
    count = 50
    for name, value in params:
        if name in ("agent", "who", "subject"):
            found["subjects"].append(value)
        elif name == "patient":
            found["patients"].append(value.removeprefix("Patient/"))
        elif name == "outcome":
            found["outcomes"].append(value)
        elif name == "action":
            found["actions"].append(value)
        elif name == "subtype":
            found["interactions"].append(value.split("|")[-1])
        elif name == "date":
            found["dates"].append((value[:2], value[2:]) if value[:2] in ("ge", "gt", "le", "lt", "eq")
                                  else ("eq", value))
        elif name == "_count":
            if not value.isdigit():
                raise BadRequest(f"_count: expected a non-negative integer, got {value!r}", expression=["_count"])
            count = min(int(value), max_count)
        elif name in ("_format", "_total"):
            continue
        else:
            raise BadRequest(f"unknown AuditEvent search parameter {name!r}", expression=[name])
    return AuditCriteria(**{k: tuple(v) for k, v in found.items()}), count


def _event(id_: str, content: str) -> dict[str, Any]:
    event = orjson.loads(content)
    event["id"] = id_
    return event


async def search(db, params: list[tuple[str, str]], *, max_count: int = 1000) -> tuple[list[dict], int]:
    """AuditEvent search (:func:`criteria`), newest first: (events, total)."""
    where, count = criteria(params, max_count=max_count)
    async with db.read() as conn:
        rows, total = await audit_repo.search(conn, where, count)
    return [_event(str(seq), content) for seq, content in rows], total


async def read(db, seq: str) -> dict[str, Any] | None:
    """AuditEvent ``seq`` (its ``id``), or None when there is none."""
    if not seq.isdigit() or len(seq) > 18:  # beyond 64 bits: never a row (not an overflow in the database)
        return None
    async with db.read() as conn:
        content = await audit_repo.content(conn, int(seq))
    return None if content is None else _event(seq, content)


async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after the store): start the flusher; flush what is pending at shutdown."""
    sink = app[keys.AUDIT]
    if isinstance(sink, ChainedAudit):
        await sink.start(app[keys.DB], CheckpointLog.for_settings(app[keys.SETTINGS]))
    yield
    if isinstance(sink, ChainedAudit):
        await sink.stop()


__all__ = ["ADVISORY_KEY", "ChainedAudit", "CheckpointLog", "VerifyResult", "admin_read", "admin_search", "admin_verify",
           "audit_ctx", "chain_hash", "criteria", "read", "search", "to_audit_event", "verify"]


def verify_main(settings) -> int:
    """``fedgate audit verify``: 0 when the chain is intact, 1 (naming the row) when not."""
    import sys

    from gateway.store import open_database

    async def run() -> VerifyResult:
        db = await open_database(settings)
        try:
            return await verify(db, CheckpointLog.for_settings(settings, create=False))
        finally:
            await db.dispose()

    result = asyncio.run(run())
    if result.ok:
        print(f"ok: {result.problem}")
        return 0
    print(f"TAMPERED: {result.problem}", file=sys.stderr)
    return 1


async def admin_search(db, sink, requester, params: list[tuple[str, str]], *, path: str = "/ui/fragments/audit"
                       ) -> tuple[list[dict], int]:
    """:func:`search` for an admin (others: 403), after flushing what is pending, audited itself."""
    from gateway.errors import Forbidden
    from gateway.services.access import AccessRecord
    from gateway.services.audit_codes import Action, Interaction, Outcome

    if not requester.is_admin:
        raise Forbidden("AuditEvent is readable by the admin role only")
    if isinstance(sink, ChainedAudit):
        await sink.flush()
    events, total = await search(db, params)
    await sink.record(AccessRecord(requester, Action.EXECUTE, Interaction.SEARCH_TYPE, Outcome.SUCCESS,
                                   detail="AuditEvent search", path=path))
    return events, total


async def admin_verify(db, sink, settings, requester) -> VerifyResult:
    """:func:`verify` of the chain against this site's checkpoints, for an admin (others: 403), audited."""
    from gateway.errors import Forbidden
    from gateway.services.access import AccessRecord
    from gateway.services.audit_codes import Action, Interaction, Outcome

    if not requester.is_admin:
        raise Forbidden("verifying the audit chain is for the admin role only")
    if isinstance(sink, ChainedAudit):
        await sink.flush()
    result = await verify(db, CheckpointLog.for_settings(settings, create=False))
    await sink.record(AccessRecord(requester, Action.EXECUTE, Interaction.AUDIT_VERIFY, Outcome.SUCCESS,
                                   detail=f"chain {'intact' if result.ok else 'TAMPERED'}"))
    return result


async def admin_read(db, sink, requester, seq: str) -> dict[str, Any]:
    """:func:`read` for an admin (others: 403; no such event: 404), after flushing what is pending, audited."""
    from gateway.errors import Forbidden, NotFound
    from gateway.services.access import AccessRecord
    from gateway.services.audit_codes import Action, Interaction, Outcome

    if not requester.is_admin:
        raise Forbidden("AuditEvent is readable by the admin role only")
    if isinstance(sink, ChainedAudit):
        await sink.flush()
    event = await read(db, seq)
    if event is None:
        raise NotFound(f"AuditEvent/{seq} not found")
    await sink.record(AccessRecord(requester, Action.READ, Interaction.READ, Outcome.SUCCESS, (f"AuditEvent/{seq}",),
                                   path="/fhir/AuditEvent/{id}"))
    return event
