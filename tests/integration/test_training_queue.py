"""The hub's training runs as a leased job queue, at the store (no sites, no torch): two hub processes (two
connections to one store, two worker ids) claim a run exactly once; a round is committed only by the
process holding the run; a cancellation or a take-over after the lease expired stops the former holder from
committing anything; and the migration that turns an older ``trn_run`` into the queue."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import inspect, select, text

from gateway.store import schema
from gateway.store import training_runs as runs
from gateway.store.db import Database
from gateway.store.leases import LeaseLost
from gateway.store.migrate import SCHEMA_VERSION, migrate
from gateway.store.training_schema import trn_checkpoint, trn_round, trn_run

ANSWER = {"site": "site-a", "status": "ok", "n_train": 10, "n_test": 4}


async def _two(db_url: str) -> tuple[Database, Database]:
    a, b = Database(db_url), Database(db_url)
    await migrate(a)
    return a, b


async def _row(db: Database, run_id: str):
    async with db.read() as conn:
        return (await conn.execute(select(trn_run).where(trn_run.c.run_id == run_id))).one()


async def _rounds(db: Database, run_id: str) -> list[int]:
    async with db.read() as conn:
        return [r.round for r in (await conn.execute(select(trn_round.c.round).where(trn_round.c.run_id == run_id)
                                                     .order_by(trn_round.c.round))).all()]


async def test_two_processes_claim_a_run_once_and_only_the_holder_commits_a_round(db_url):
    a, b = await _two(db_url)
    try:
        qa, qb = runs.run_queue(a, "worker-a", 30.0), runs.run_queue(b, "worker-b", 30.0)
        await runs.insert_run(a, "r1", {"rounds": 3}, {"subject": "ana"})
        claims = await asyncio.gather(*(q.claim() for q in (qa, qb, qa, qb)))
        won = [c for c in claims if c is not None]
        assert len(won) == 1 and won[0].run_id == "r1" and won[0].attempts == 1
        holder, other = (qa, qb) if won[0].lease_owner == "worker-a" else (qb, qa)
        assert await holder.holds("r1") and not await other.holds("r1")
        # round 1 by the holder: answers, round, checkpoint in one transaction
        async with holder.holding("r1", round=1) as conn:
            await runs.record_answers(conn, "r1", 1, [ANSWER])
            await runs.save_checkpoint(conn, "r1", 1, b"weights-1")
        # the other process cannot commit a round of it
        with pytest.raises(LeaseLost):  # no commit without the lease
            async with other.holding("r1", round=2) as conn:
                await runs.record_answers(conn, "r1", 2, [ANSWER])
        assert (await _row(a, "r1")).round == 1 and await _rounds(a, "r1") == [1]
        assert await runs.load_checkpoint(b, "r1") == (1, b"weights-1")
    finally:
        await a.dispose()
        await b.dispose()


async def test_an_expired_lease_is_taken_over_and_the_stalled_holder_commits_nothing(db_url):
    a, b = await _two(db_url)
    try:
        stalled, taker = runs.run_queue(a, "worker-a", 0.3), runs.run_queue(b, "worker-b", 30.0)
        await runs.insert_run(a, "r2", {}, {"subject": "ana"})
        assert (await stalled.claim()).run_id == "r2"
        async with stalled.holding("r2", round=1) as conn:
            await runs.save_checkpoint(conn, "r2", 1, b"w1")
        assert await taker.claim() is None  # the lease is fresh
        await asyncio.sleep(0.5)  # the holder stalls past its lease
        row = await taker.claim()
        assert row is not None and row.lease_owner == "worker-b" and row.attempts == 2 and row.round == 1
        assert await runs.load_checkpoint(b, "r2") == (1, b"w1")  # the taker resumes after round 1
        for step in (lambda: stalled.holding("r2", round=2), lambda: stalled.holding("r2")):
            with pytest.raises(LeaseLost):  # no commit without the lease
                async with step() as conn:
                    await runs.save_checkpoint(conn, "r2", 2, b"stale")
        assert not await stalled.finish("r2", state="queued", lease_owner=None)  # nor hands it back
        assert await runs.load_checkpoint(b, "r2") == (1, b"w1")
        row = await _row(b, "r2")
        assert (row.state, row.lease_owner, row.round) == ("running", "worker-b", 1)
    finally:
        await a.dispose()
        await b.dispose()


async def test_a_cancellation_ends_the_holders_commits_and_drops_the_checkpoint(db_url):
    a, b = await _two(db_url)
    try:
        q = runs.run_queue(a, "worker-a", 30.0)
        await runs.insert_run(a, "r3", {}, {"subject": "ana"})
        await q.claim()
        async with q.holding("r3", round=1) as conn:
            await runs.save_checkpoint(conn, "r3", 1, b"w1")
        assert await runs.cancel_run(b, "r3", "cancelled by ana")  # through the other process
        assert not await runs.cancel_run(b, "r3", "again")  # already ended
        assert not await q.holds("r3")
        with pytest.raises(LeaseLost):  # no commit without the lease
            async with q.holding("r3", round=2) as conn:
                await runs.record_answers(conn, "r3", 2, [ANSWER])
        row = await _row(a, "r3")
        assert (row.state, row.round, row.lease_owner) == ("cancelled", 1, None)
        assert await runs.load_checkpoint(a, "r3") is None and await _rounds(a, "r3") == []
        assert await q.claim() is None
    finally:
        await a.dispose()
        await b.dispose()


async def test_migration_makes_an_older_trn_run_the_queue(db_url):
    """A database from before the run queue: ``trn_run`` without the lease columns; the runs it left queued or
    running (no checkpoint to resume from) are failed, the others kept, and new runs are claimable."""
    db = Database(db_url)
    try:
        await migrate(db)
        async with db.write() as conn:
            await conn.execute(text("DROP TABLE trn_run"))
            await conn.execute(text(
                "CREATE TABLE trn_run (run_id VARCHAR(64) PRIMARY KEY, spec TEXT NOT NULL,"
                " state VARCHAR(16) NOT NULL, round INTEGER NOT NULL, requester TEXT NOT NULL,"
                " created_ts FLOAT NOT NULL, updated_ts FLOAT NOT NULL, error TEXT, model_name VARCHAR(64),"
                " model_version VARCHAR(64), weights_hash VARCHAR(64), lineage TEXT)"))
            now = time.time()
            for run_id, state in (("old-running", "running"), ("old-queued", "queued"), ("old-done", "succeeded")):
                await conn.execute(text(
                    "INSERT INTO trn_run (run_id, spec, state, round, requester, created_ts, updated_ts) "
                    "VALUES (:r, '{}', :s, 2, '{}', :t, :t)"), {"r": run_id, "s": state, "t": now})
            await conn.execute(schema.schema_version.update().where(schema.schema_version.c.component == "core")
                               .values(version=2))
        await migrate(db)
        async with db.read() as conn:
            cols = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("trn_run")})
            version = (await conn.execute(select(schema.schema_version.c.version)
                                          .where(schema.schema_version.c.component == "core"))).scalar_one()
            assert "trn_checkpoint" in await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert {"attempts", "lease_owner", "lease_until", "not_before"} <= cols and version == SCHEMA_VERSION == 3
        for run_id, state in (("old-running", "failed"), ("old-queued", "failed"), ("old-done", "succeeded")):
            row = await _row(db, run_id)
            assert row.state == state and row.attempts == 0, (run_id, row)
            assert (row.error is not None and "interrupted" in row.error) == (state == "failed")
        q = runs.run_queue(db, "w", 30.0)
        assert await q.claim() is None  # the old runs are not resumed
        await runs.insert_run(db, "new", {}, {"subject": "ana"})
        assert (await q.claim()).run_id == "new"
        await migrate(db)  # idempotent
        assert (await _row(db, "new")).state == "running"
        async with db.read() as conn:
            assert (await conn.execute(select(trn_checkpoint))).all() == []
    finally:
        await db.dispose()
