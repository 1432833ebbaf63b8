"""A leased job queue over one table: inference jobs, bulk and imaging exports, federated training runs.

A job row carries ``state`` (``queued`` → ``running`` → a final state), ``not_before``, ``attempts``,
``lease_owner`` and ``lease_until``.  A worker claims one queued row, or a running row whose lease has
expired (its worker died), with a conditional UPDATE: of several server processes racing for the same row
exactly one UPDATE matches.  The holder renews the lease while it works (:meth:`LeasedQueue.heartbeat`)
and only the holder may finish the job (:meth:`LeasedQueue.finish`): a worker that lost its lease (it
stalled past ``lease_s``) can no longer overwrite what the new holder does; :meth:`LeasedQueue.holding`
is a write transaction that commits only while this worker holds the job (a step of a long job, its
progress and checkpoint together).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from sqlalchemy import Table, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.db import Database

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This worker no longer holds the job: it was cancelled, finished, or taken over after its lease expired."""


class LeasedQueue:
    def __init__(self, db: Database, table: Table, key: str, worker_id: str, lease_s: float) -> None:
        self.db, self.table, self.worker_id, self.lease_s = db, table, worker_id, lease_s
        self.key = table.c[key]

    def claimable(self, now: float):
        t = self.table
        return or_(and_(t.c.state == "queued", t.c.not_before <= now),
                   and_(t.c.state == "running", t.c.lease_until < now))

    async def claim(self) -> Any | None:
        """Lease one job (the oldest ``not_before`` first) and return its row, or None."""
        t = self.table
        now = time.time()
        claimable = self.claimable(now)
        async with self.db.write() as conn:
            cand = (await conn.execute(select(self.key, t.c.attempts).where(claimable)
                                       .order_by(t.c.not_before).limit(1))).first()
            if cand is None:
                return None
            res = await conn.execute(update(t).where(self.key == cand[0], claimable).values(
                state="running", lease_owner=self.worker_id, lease_until=now + self.lease_s,
                attempts=cand.attempts + 1, updated_ts=now))
            if res.rowcount != 1:
                return None
            return (await conn.execute(select(t).where(self.key == cand[0]))).one()

    async def update(self, job_id: str, **values: Any) -> bool:
        """Change the job while this worker holds its lease (the lease is renewed with it); False when the
        lease is lost or the job is gone (cancelled)."""
        try:
            async with self.holding(job_id, **values):
                return True
        except LeaseLost:
            return False

    @asynccontextmanager
    async def holding(self, job_id: str, **values: Any) -> AsyncIterator[AsyncConnection]:
        """A write transaction that goes ahead only while this worker holds the job: its row is updated
        first (the lease renewed, ``values`` set), then the caller's statements run; :class:`LeaseLost`,
        and nothing written, when the job is no longer this worker's.  The row stays locked until the
        commit (PostgreSQL; SQLite: the write lock), so a cancellation either comes before (LeaseLost) or
        after the whole transaction."""
        t = self.table
        now = time.time()
        async with self.db.write() as conn:
            res = await conn.execute(update(t).where(
                self.key == job_id, t.c.lease_owner == self.worker_id, t.c.state == "running").values(
                {"updated_ts": now, "lease_until": now + self.lease_s, **values}))
            if res.rowcount != 1:
                raise LeaseLost(job_id)
            yield conn

    async def holds(self, job_id: str) -> bool:
        """Whether this worker still holds the job (a read)."""
        t = self.table
        async with self.db.read() as conn:
            row = (await conn.execute(select(t.c.state, t.c.lease_owner).where(self.key == job_id))).first()
        return row is not None and row.state == "running" and row.lease_owner == self.worker_id

    async def finish(self, job_id: str, **values: Any) -> bool:
        """Final (or re-queue) values for the job this worker holds; False when it no longer holds it."""
        t = self.table
        async with self.db.write() as conn:
            res = await conn.execute(update(t).where(
                self.key == job_id, t.c.lease_owner == self.worker_id, t.c.state == "running").values(
                updated_ts=time.time(), **values))
            return res.rowcount == 1

    async def heartbeat(self, job_id: str) -> None:
        """Renew the lease every third of it, until cancelled (run as a task beside the job)."""
        t = self.table
        while True:
            await asyncio.sleep(self.lease_s / 3)
            async with self.db.write() as conn:
                await conn.execute(update(t).where(self.key == job_id, t.c.lease_owner == self.worker_id)
                                   .values(lease_until=time.time() + self.lease_s))


async def poll_worker(name: str, run_once: Callable[[], Awaitable[bool]], wake: asyncio.Event,
                      poll_s: Callable[[], float], before: Callable[[], Awaitable[Any]] | None = None) -> None:
    """A job queue's worker loop: ``before`` (housekeeping, if any), then ``run_once`` until it finds no job,
    then sleep until ``wake`` is set or ``poll_s()`` seconds pass.  A store error ends the round only (the
    store is briefly unavailable: try again next round)."""
    from sqlalchemy.exc import SQLAlchemyError

    while True:
        try:
            if before is not None:
                await before()
            while await run_once():
                pass
        except SQLAlchemyError as e:
            log.warning(f"{name} worker: store error", extra={"error": type(e).__name__})
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), poll_s())
        except asyncio.TimeoutError:
            pass


__all__ = ["LeaseLost", "LeasedQueue", "poll_worker"]
