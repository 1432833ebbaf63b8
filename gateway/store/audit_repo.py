"""The audit trail's SQL (table: :mod:`gateway.store.audit_schema`): appending to the hash chain under its head
lock, walking it in order, reading one event, searching events.  Hashing, checkpoints and the meaning of a
search parameter live in :mod:`gateway.services.audit`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncResult

from gateway.store.audit_schema import GENESIS, audit_event

ADVISORY_KEY = 0x4A7D17  # pg_advisory_xact_lock key of the audit chain head


async def lock_head(conn: AsyncConnection) -> None:
    """PostgreSQL: serialise appends to the chain until the transaction ends, across server processes.
    SQLite: nothing to do (its write transactions run one at a time)."""
    if conn.dialect.name != "sqlite":
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({ADVISORY_KEY})"))


async def head(conn: AsyncConnection) -> tuple[int, str]:
    """``(seq, hash)`` of the newest row; ``(0, GENESIS)`` for an empty chain."""
    last = (await conn.execute(select(audit_event.c.seq, audit_event.c.hash)
                               .order_by(audit_event.c.seq.desc()).limit(1))).first()
    return (last[0], last[1]) if last is not None else (0, GENESIS)


async def append(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await conn.execute(audit_event.insert(), rows)


async def stream_chain(conn: AsyncConnection) -> AsyncResult[Any]:
    """Every row in ``seq`` order, streamed (the caller closes the result)."""
    return await conn.stream(select(audit_event).order_by(audit_event.c.seq))


async def content(conn: AsyncConnection, seq: int) -> str | None:
    """The canonical JSON of event ``seq``, if there is one."""
    return (await conn.execute(select(audit_event.c.content).where(audit_event.c.seq == seq))).scalar()


@dataclass(frozen=True, slots=True)
class AuditCriteria:
    """AND of every condition given (each tuple: one condition per occurrence of the parameter)."""

    subjects: tuple[str, ...] = ()
    #: patient ids (without ``Patient/``)
    patients: tuple[str, ...] = ()
    outcomes: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    interactions: tuple[str, ...] = ()
    #: (prefix: ge, gt, le, lt or eq; the ISO date-time text it compares with ``recorded``)
    dates: tuple[tuple[str, str], ...] = ()


def _where(c: AuditCriteria) -> list[Any]:
    A = audit_event
    where: list[Any] = [A.c.subject == v for v in c.subjects]
    where += [A.c.patients.like(f"% {v} %") for v in c.patients]
    where += [A.c.outcome == v for v in c.outcomes]
    where += [A.c.action == v for v in c.actions]
    where += [A.c.interaction == v for v in c.interactions]
    col = A.c.recorded
    where += [{"ge": col >= v, "gt": col > v, "le": col <= v + "\uffff", "lt": col < v, "eq": col.like(v + "%")}[op]
              for op, v in c.dates]
    return where


async def search(conn: AsyncConnection, criteria: AuditCriteria, count: int) -> tuple[list[Row[Any]], int]:
    """Up to ``count`` matching ``(seq, content)`` rows, newest first, and the number of matches."""
    A = audit_event
    where = _where(criteria)
    total = (await conn.execute(select(func.count()).select_from(A).where(*where))).scalar_one()
    rows = (await conn.execute(select(A.c.seq, A.c.content).where(*where).order_by(A.c.seq.desc())
                               .limit(count))).all()
    return list(rows), total
