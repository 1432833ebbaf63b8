"""Audit trail (issue #4): every data access → a hash-chained FHIR AuditEvent, searchable by admins
only; `fedgate audit verify` detects a modified or deleted row and names it."""

from __future__ import annotations

import subprocess

import aiohttp
import orjson
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer

from gateway import keys
from gateway.app import create_app
from gateway.services.consent import ConsentGate
from gateway.store.audit_schema import audit_event
from gateway.store.db import Database
from tests.conftest import Gateway
from tests.procs import FEDGATE, REPO

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _verify(settings) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDGATE, "audit", "verify", "--data-dir", str(settings.data_dir),
                           "--database-url", settings.database_url], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)


async def test_accesses_are_audited_chained_and_admin_searchable(settings):
    app = create_app(settings)
    app[keys.GATE] = ConsentGate(settings)  # (also the default once wired in create_app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gw = Gateway(server, settings)
    try:
        async with aiohttp.ClientSession() as http:
            pat = {"resourceType": "Patient", "id": "pa1", "gender": "male"}
            async with http.put(f"{gw.fhir}/Patient/pa1", json=pat,
                                headers=gw.headers("ehr-system", subject="ehr-1", org="Hospital A") | FHIR_JSON) as r:
                assert r.status == 201
            async with http.get(f"{gw.fhir}/Patient/pa1", headers=gw.headers("clinician", subject="dr-who")) as r:
                assert r.status == 200
            async with http.get(f"{gw.fhir}/Patient", headers=gw.headers(
                    "analyst", subject="ana", purpose={"codes": ["DUO:0000042"]})) as r:
                assert r.status == 200
            async with http.get(f"{gw.fhir}/Patient", headers=gw.headers("clinician", subject="dr-x",
                                                                          purpose={"codes": ["DUO:0000042"]})) as r:
                assert r.status == 403  # refused research by a clinical role: audited as a failure too
            # non-admins cannot read the audit trail (OperationOutcome 403)
            for role in ("analyst", "clinician", "ehr-system"):
                async with http.get(f"{gw.fhir}/AuditEvent", headers=gw.headers(role)) as r:
                    assert r.status == 403
                    assert (await r.json())["resourceType"] == "OperationOutcome"
            admin = gw.headers("admin")
            async with http.get(f"{gw.fhir}/AuditEvent", params={"agent": "dr-who"}, headers=admin) as r:
                assert r.status == 200
                b = await r.json()
            assert b["total"] == 1
            ev = b["entry"][0]["resource"]
            assert ev["resourceType"] == "AuditEvent" and ev["action"] == "R" and ev["outcome"] == "0"
            assert ev["subtype"][0]["code"] == "read"
            assert {"what": {"reference": "Patient/pa1"}} in ev["entity"]
            assert ev["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
            assert [c["code"] for c in ev["agent"][0]["role"][0]["coding"]] == ["clinician"]
            async with http.get(f"{gw.fhir}/AuditEvent", params={"agent": "ehr-1"}, headers=admin) as r:
                ev = (await r.json())["entry"][0]["resource"]
            assert ev["action"] == "C" and ev["agent"][0]["who"]["display"] == "Hospital A"
            async with http.get(f"{gw.fhir}/AuditEvent", params={"agent": "ana"}, headers=admin) as r:
                ev = (await r.json())["entry"][0]["resource"]
            assert ev["purposeOfEvent"][0]["coding"][0]["code"] == "DUO:0000042"
            assert "consent profiles permit" in ev["outcomeDesc"]
            async with http.get(f"{gw.fhir}/AuditEvent", params={"agent": "dr-x"}, headers=admin) as r:
                ev = (await r.json())["entry"][0]["resource"]
            assert ev["outcome"] == "4" and "clinical roles" in ev["outcomeDesc"]
            async with http.get(f"{gw.fhir}/AuditEvent", params={"patient": "pa1"}, headers=admin) as r:
                assert (await r.json())["total"] >= 2
            async with http.get(f"{gw.fhir}/AuditEvent/{ev['id']}", headers=admin) as r:
                assert r.status == 200 and (await r.json())["id"] == ev["id"]
            async with http.get(f"{gw.fhir}/AuditEvent", params={"bogus": "1"}, headers=admin) as r:
                assert r.status == 400
    finally:
        await gw.server.close()  # flushes pending events

    done = _verify(settings)
    assert done.returncode == 0, done.stderr
    db = Database(settings.effective_database_url)
    try:
        async with db.read() as conn:
            rows = (await conn.execute(sa.select(audit_event.c.seq, audit_event.c.content)
                                       .order_by(audit_event.c.seq))).all()
        assert len(rows) >= 8
        victim = rows[2]
        async with db.write() as conn:  # tamper: rewrite who did it
            await conn.execute(sa.update(audit_event).where(audit_event.c.seq == victim.seq)
                               .values(content=victim.content.replace('"outcome":"0"', '"outcome":"8"')))
        done = _verify(settings)
        assert done.returncode == 1 and f"seq={victim.seq}" in done.stderr, done.stderr
        async with db.write() as conn:  # restore, then delete a row: the next one no longer links
            await conn.execute(sa.update(audit_event).where(audit_event.c.seq == victim.seq)
                               .values(content=victim.content))
        assert _verify(settings).returncode == 0
        async with db.write() as conn:
            await conn.execute(sa.delete(audit_event).where(audit_event.c.seq == rows[3].seq))
        done = _verify(settings)
        assert done.returncode == 1 and f"seq={rows[4].seq}" in done.stderr, done.stderr
    finally:
        await db.dispose()
    assert keys.AUDIT  # the sink is wired in create_app


async def _held_chain(db: Database, release: "asyncio.Event", holding: "asyncio.Event") -> None:
    """A write transaction holding what an audit flush needs (SQLite: the write lock; PostgreSQL: the chain
    head's advisory lock) until ``release``."""
    from gateway.services.audit import ADVISORY_KEY

    async with db.write() as conn:
        if not db.is_sqlite:
            await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({ADVISORY_KEY})"))
        holding.set()
        await release.wait()


async def _chain_rows(db: Database) -> list[str]:
    async with db.read() as conn:
        contents = (await conn.execute(sa.select(audit_event.c.content).order_by(audit_event.c.seq))).scalars()
        return [orjson.loads(c)["outcomeDesc"] for c in contents]


async def test_no_event_is_lost_when_a_flush_is_cancelled_or_the_sink_stops_mid_flush(db_url):
    """A flush whose write is cancelled (the client of the request that triggered it went away, or the
    server stops) puts its events back; stop() lets a flush in progress finish instead of cancelling it.
    Before, both lost the batch: an access without its AuditEvent."""
    import asyncio

    from gateway.context import SYSTEM
    from gateway.services.access import AccessRecord
    from gateway.services.audit import ChainedAudit
    from gateway.store.migrate import migrate

    db = Database(db_url)
    await migrate(db)
    try:
        sink = ChainedAudit("site-a", batch_delay_s=0.01)
        sink.db = db  # flushes on demand only (no background flusher yet)
        for i in range(5):
            await sink.record(AccessRecord(SYSTEM, "R", "read", "0", detail=f"cancelled-{i}"))
        release, holding = asyncio.Event(), asyncio.Event()
        blocker = asyncio.create_task(_held_chain(db, release, holding))
        await holding.wait()
        flush = asyncio.create_task(sink.flush())
        await asyncio.sleep(0.3)  # the flush took its batch and waits for the database
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        release.set()
        await blocker
        await sink.flush()
        assert await _chain_rows(db) == [f"cancelled-{i}" for i in range(5)]

        await sink.start(db)  # the background flusher, stopped while its flush waits for the database
        release, holding = asyncio.Event(), asyncio.Event()
        blocker = asyncio.create_task(_held_chain(db, release, holding))
        await holding.wait()
        for i in range(5):
            await sink.record(AccessRecord(SYSTEM, "R", "read", "0", detail=f"stopping-{i}"))
        await asyncio.sleep(0.3)
        stopping = asyncio.create_task(sink.stop())
        await asyncio.sleep(0.2)
        release.set()
        await blocker
        await stopping
        assert await _chain_rows(db) == [f"cancelled-{i}" for i in range(5)] + [f"stopping-{i}" for i in range(5)]
    finally:
        await db.dispose()
