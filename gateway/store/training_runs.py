"""The hub's training runs in the store: the run rows (also the hub's job queue, :func:`run_queue`), the
per-round site answers and the checkpoint of a run in progress (tables: :mod:`gateway.store.training_schema`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.db import Database
from gateway.store.leases import LeasedQueue
from gateway.store.training_schema import trn_checkpoint, trn_round, trn_run

#: Run states after which nothing changes any more.
FINAL = ("succeeded", "failed", "cancelled")


def run_queue(db: Database, worker_id: str, lease_s: float) -> LeasedQueue:
    """The runs as a leased job queue: a hub process claims one (``queued``, or ``running`` with an expired
    lease) and holds it while it runs the rounds."""
    return LeasedQueue(db, trn_run, "run_id", worker_id, lease_s)


async def insert_run(db: Database, run_id: str, spec: dict, requester: dict) -> None:
    now = time.time()
    async with db.write() as conn:
        await conn.execute(trn_run.insert().values(
            run_id=run_id, spec=orjson.dumps(spec).decode(), state="queued", round=0,
            requester=orjson.dumps(requester).decode(), created_ts=now, updated_ts=now, attempts=0,
            not_before=now))


async def run_row(db: Database, run_id: str) -> Any | None:
    async with db.read() as conn:
        return (await conn.execute(select(trn_run).where(trn_run.c.run_id == run_id))).first()


async def run_with_rounds(db: Database, run_id: str) -> tuple[Any, list] | None:
    """The run's row and its per round and site answers (round, then site order), or None."""
    async with db.read() as conn:
        row = (await conn.execute(select(trn_run).where(trn_run.c.run_id == run_id))).first()
        if row is None:
            return None
        rounds = (await conn.execute(select(trn_round).where(trn_round.c.run_id == run_id)
                                     .order_by(trn_round.c.round, trn_round.c.site_id))).mappings().all()
    return row, list(rounds)


async def recent_runs(db: Database, limit: int = 500) -> list:
    async with db.read() as conn:
        return list((await conn.execute(select(trn_run).order_by(trn_run.c.created_ts.desc()).limit(limit))).all())


async def cancel_run(db: Database, run_id: str, error: str) -> bool:
    """Mark the run cancelled unless it already ended (False then).  The process holding it sees that it
    no longer holds the run and stops; nothing it writes afterwards is committed
    (:meth:`~gateway.store.leases.LeasedQueue.holding`)."""
    async with db.write() as conn:
        res = await conn.execute(update(trn_run).where(trn_run.c.run_id == run_id, trn_run.c.state.not_in(FINAL))
                                 .values(state="cancelled", error=error, lease_owner=None, lease_until=None,
                                         updated_ts=time.time()))
        if res.rowcount == 1:
            await drop_checkpoint(conn, run_id)
        return res.rowcount == 1


async def record_answers(conn: AsyncConnection, run_id: str, rnd: int, answers: list[dict]) -> None:
    """The sites' answers of round ``rnd`` (replacing those of an earlier try of the same round)."""
    now = time.time()
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


async def save_checkpoint(conn: AsyncConnection, run_id: str, rnd: int, weights: bytes) -> None:
    await drop_checkpoint(conn, run_id)
    await conn.execute(trn_checkpoint.insert().values(run_id=run_id, round=rnd, weights=weights, ts=time.time()))


async def drop_checkpoint(conn: AsyncConnection, run_id: str) -> None:
    await conn.execute(trn_checkpoint.delete().where(trn_checkpoint.c.run_id == run_id))


async def load_checkpoint(db: Database, run_id: str) -> tuple[int, bytes] | None:
    """(round, encoded global weights after it) of a run in progress, or None before its first round."""
    async with db.read() as conn:
        row = (await conn.execute(select(trn_checkpoint.c.round, trn_checkpoint.c.weights)
                                  .where(trn_checkpoint.c.run_id == run_id))).first()
    return (row.round, bytes(row.weights)) if row is not None else None


async def end_run(db: Database, run_id: str) -> None:
    """Drop what only a run in progress needs (its checkpoint)."""
    async with db.write() as conn:
        await drop_checkpoint(conn, run_id)


async def mark_succeeded(conn: AsyncConnection, run_id: str, **values: Any) -> None:
    """On a transaction that holds the run (:meth:`~gateway.store.leases.LeasedQueue.holding`)."""
    await conn.execute(update(trn_run).where(trn_run.c.run_id == run_id).values(
        state="succeeded", lease_owner=None, lease_until=None, updated_ts=time.time(), **values))
    await drop_checkpoint(conn, run_id)


__all__ = ["FINAL", "run_queue", "insert_run", "run_row", "run_with_rounds", "recent_runs", "cancel_run",
           "record_answers", "save_checkpoint", "drop_checkpoint", "load_checkpoint", "end_run", "mark_succeeded"]
