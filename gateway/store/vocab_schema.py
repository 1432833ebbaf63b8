"""The vocabulary store (docs/vocab.md): code systems, concepts and their transitive is-a closure.

Versioned: every ``fedgate vocab load`` writes a new ``vocab_release`` (what, which release, when)
and its rows under that ``version_id`` while the current version keeps serving; one short transaction
then points ``vocab_active`` (one row per system) at the new version.  Every query joins through
``vocab_active``, so readers see the old closure or the new one, never a mix, and nothing stops.
``fedgate vocab prune`` deletes versions no system points at.

``vocab_ancestor`` holds the *strict* closure (ancestor ≠ descendant) with the minimum number of
levels; the code itself is added by the callers that want "self or descendants".
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    select,
    update,
)

from gateway.store.schema import PK, metadata

vocab_release = Table(
    "vocab_release",
    metadata,
    Column("version_id", PK, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("release", String(200), nullable=False, default=""),
    Column("format", String(32), nullable=False),
    Column("source", Text, nullable=True),
    Column("systems", Text, nullable=False, default=""),
    Column("loaded_at", String(40), nullable=False),
    #: loading → active (some system points at it) → retired (replaced; prune deletes it)
    Column("state", String(16), nullable=False),
    Column("concepts", Integer, nullable=False, default=0),
    Column("closure_rows", BigInteger, nullable=False, default=0),
)

vocab_active = Table(
    "vocab_active",
    metadata,
    Column("system", String(255), primary_key=True),
    Column("version_id", BigInteger, nullable=False),
    Column("switched_at", String(40), nullable=False),
)

vocab_concept = Table(
    "vocab_concept",
    metadata,
    Column("version_id", BigInteger, primary_key=True),
    Column("system", String(255), primary_key=True),
    Column("code", String(255), primary_key=True),
    Column("display", Text, nullable=True),
    Column("concept_id", BigInteger, nullable=True),
    Column("vocabulary_id", String(64), nullable=True),
)

vocab_ancestor = Table(
    "vocab_ancestor",
    metadata,
    Column("version_id", BigInteger, primary_key=True),
    Column("system", String(255), primary_key=True),
    Column("ancestor", String(255), primary_key=True),
    Column("descendant", String(255), primary_key=True),
    Column("min_levels", Integer, nullable=False, default=1),
)
Index("ix_vocab_ancestor_desc", vocab_ancestor.c.version_id, vocab_ancestor.c.system,
      vocab_ancestor.c.descendant)

CONCEPT_COLS = ("version_id", "system", "code", "display", "concept_id", "vocabulary_id")
ANCESTOR_COLS = ("version_id", "system", "ancestor", "descendant", "min_levels")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Writing a release
# ------------------------------------------------------------------------------------------------


async def begin_release(conn, *, name: str, release: str, fmt: str, source: str | None) -> int:
    res = await conn.execute(insert(vocab_release).values(
        name=name[:200], release=(release or "")[:200], format=fmt, source=source, systems="",
        loaded_at=now_iso(), state="loading", concepts=0, closure_rows=0).returning(vocab_release.c.version_id))
    return int(res.scalar_one())


async def insert_rows(conn, table: Table, cols: tuple[str, ...], rows: list[tuple]) -> None:
    """Bulk insert of tuples: COPY on PostgreSQL (asyncpg), executemany on SQLite."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.copy_records_to_table(table.name, records=rows, columns=list(cols))
        return
    placeholders = ",".join("?" * len(cols))
    raw = (await conn.get_raw_connection()).driver_connection
    await raw.executemany(f"INSERT INTO {table.name} ({','.join(cols)}) VALUES ({placeholders})", rows)


async def activate(conn, version_id: int, systems: Iterable[str], *, concepts: int, closure: int) -> list[int]:
    """Point every system of the release at ``version_id`` (one transaction); returns the versions it
    replaced (now retired when no system points at them any more)."""
    systems = sorted(set(systems))
    old = {r[0] for r in (await conn.execute(
        select(vocab_active.c.version_id).where(vocab_active.c.system.in_(systems)))).all()} if systems else set()
    at = now_iso()
    for system in systems:
        res = await conn.execute(update(vocab_active).where(vocab_active.c.system == system)
                                 .values(version_id=version_id, switched_at=at))
        if res.rowcount == 0:
            await conn.execute(insert(vocab_active).values(system=system, version_id=version_id, switched_at=at))
    await conn.execute(update(vocab_release).where(vocab_release.c.version_id == version_id).values(
        state="active", systems=" ".join(systems), concepts=concepts, closure_rows=closure))
    if conn.dialect.name == "postgresql":  # fresh statistics for the new rows: the planner's descendants join
        from sqlalchemy import text

        await conn.execute(text("ANALYZE vocab_ancestor"))
        await conn.execute(text("ANALYZE vocab_concept"))
    still = {r[0] for r in (await conn.execute(select(vocab_active.c.version_id).distinct())).all()}
    retired = sorted(v for v in old if v not in still and v != version_id)
    if retired:
        await conn.execute(update(vocab_release).where(vocab_release.c.version_id.in_(retired)).values(state="retired"))
    return retired


async def prune(conn) -> list[int]:
    """Delete every release no system points at (retired, or a load that never finished)."""
    live = select(vocab_active.c.version_id)
    dead = [r[0] for r in (await conn.execute(
        select(vocab_release.c.version_id).where(vocab_release.c.version_id.not_in(live)))).all()]
    for v in dead:
        await conn.execute(delete(vocab_ancestor).where(vocab_ancestor.c.version_id == v))
        await conn.execute(delete(vocab_concept).where(vocab_concept.c.version_id == v))
        await conn.execute(delete(vocab_release).where(vocab_release.c.version_id == v))
    return dead


async def list_releases(conn) -> list[dict]:
    rows = (await conn.execute(select(vocab_release).order_by(vocab_release.c.version_id))).mappings().all()
    return [dict(r) for r in rows]


# ------------------------------------------------------------------------------------------------
# Reading (always through vocab_active)
# ------------------------------------------------------------------------------------------------


def _active(table: Table, system: str | None):
    """``table`` joined with the active version of its system (optionally one system)."""
    act = vocab_active
    j = table.join(act, and_(act.c.system == table.c.system, act.c.version_id == table.c.version_id))
    return j


def descendants_select(system: str | None, code: str):
    """``SELECT descendant`` of the strict descendants of ``code`` (in ``system``, or any loaded system)."""
    a = vocab_ancestor
    stmt = select(a.c.descendant).select_from(_active(a, system)).where(a.c.ancestor == code)
    if system:
        stmt = stmt.where(a.c.system == system)
    return stmt


def ancestors_select(system: str | None, code: str):
    a = vocab_ancestor
    stmt = select(a.c.ancestor).select_from(_active(a, system)).where(a.c.descendant == code)
    if system:
        stmt = stmt.where(a.c.system == system)
    return stmt


async def lookup(conn, system: str, code: str) -> dict | None:
    c = vocab_concept
    row = (await conn.execute(select(c, vocab_release.c.name, vocab_release.c.release)
                              .select_from(_active(c, system).join(vocab_release, vocab_release.c.version_id == c.c.version_id))
                              .where(c.c.system == system, c.c.code == code))).mappings().first()
    if row is None:
        return None
    out = dict(row)
    out["parents"] = [r[0] for r in (await conn.execute(
        ancestors_select(system, code).where(vocab_ancestor.c.min_levels == 1).order_by(vocab_ancestor.c.ancestor))).all()]
    out["children"] = [r[0] for r in (await conn.execute(
        descendants_select(system, code).where(vocab_ancestor.c.min_levels == 1).order_by(vocab_ancestor.c.descendant))).all()]
    return out


async def subsumes(conn, system: str, a: str, b: str) -> str | None:
    """FHIR ``$subsumes`` outcome of code ``a`` against ``b``: equivalent / subsumes / subsumed-by /
    not-subsumed; None when either code is not in the loaded system."""
    c = vocab_concept
    known = {r[0] for r in (await conn.execute(select(c.c.code).select_from(_active(c, system)).where(
        c.c.system == system, c.c.code.in_([a, b])))).all()}
    if a not in known or b not in known:
        return None
    if a == b:
        return "equivalent"
    anc = vocab_ancestor
    pair = select(func.count()).select_from(_active(anc, system)).where(anc.c.system == system)
    if (await conn.execute(pair.where(anc.c.ancestor == a, anc.c.descendant == b))).scalar_one():
        return "subsumes"
    if (await conn.execute(pair.where(anc.c.ancestor == b, anc.c.descendant == a))).scalar_one():
        return "subsumed-by"
    return "not-subsumed"


async def expand(conn, system: str, *, is_a: str | None = None, offset: int = 0, count: int = 1000,
                 text: str | None = None) -> tuple[int, list[dict]] | None:
    """Codes of ``system`` (all, or ``is_a``: the code and its descendants): (total, page of rows);
    None when the system is not loaded."""
    c = vocab_concept
    if (await conn.execute(select(vocab_active.c.version_id).where(vocab_active.c.system == system))).first() is None:
        return None
    base = select(c.c.system, c.c.code, c.c.display).select_from(_active(c, system)).where(c.c.system == system)
    if is_a is not None:
        base = base.where((c.c.code == is_a) | c.c.code.in_(descendants_select(system, is_a)))
    if text:
        base = base.where(func.lower(c.c.display).contains(text.lower(), autoescape=True))
    total = (await conn.execute(select(func.count()).select_from(base.subquery()))).scalar_one()
    rows = (await conn.execute(base.order_by(c.c.code).offset(offset).limit(count))).mappings().all()
    return int(total), [dict(r) for r in rows]


async def hierarchies(conn, formats: tuple[str, ...] = ("obo", "owl", "fhir-codesystem")) -> dict[str, frozenset[str]]:
    """``code → strict ancestors`` of every active system loaded from ``formats`` (the disease
    ontologies DUO DS matching uses; codes are CURIEs).  Codes without ancestors map to an empty set:
    known, so a DS restriction on exactly that code still matches."""
    c, a, r = vocab_concept, vocab_ancestor, vocab_release
    act = vocab_active
    out: dict[str, set[str]] = {}
    known = select(c.c.code).select_from(
        c.join(act, and_(act.c.system == c.c.system, act.c.version_id == c.c.version_id))
        .join(r, r.c.version_id == c.c.version_id)).where(r.c.format.in_(formats))
    for (code,) in (await conn.execute(known)).all():
        out.setdefault(code, set())
    pairs = select(a.c.descendant, a.c.ancestor).select_from(
        a.join(act, and_(act.c.system == a.c.system, act.c.version_id == a.c.version_id))
        .join(r, r.c.version_id == a.c.version_id)).where(r.c.format.in_(formats))
    for desc, anc in (await conn.execute(pairs)).all():
        out.setdefault(desc, set()).add(anc)
    return {k: frozenset(v) for k, v in out.items()}


async def generation(conn) -> tuple:
    """A value that changes whenever any system switches version (for caches)."""
    rows = (await conn.execute(select(vocab_active.c.system, vocab_active.c.version_id)
                               .order_by(vocab_active.c.system))).all()
    return tuple((s, int(v)) for s, v in rows)


__all__ = ["vocab_release", "vocab_active", "vocab_concept", "vocab_ancestor", "begin_release", "insert_rows",
           "activate", "prune", "list_releases", "descendants_select", "ancestors_select", "lookup", "subsumes",
           "expand", "hierarchies", "generation"]
