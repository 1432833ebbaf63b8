"""InlineConnection (gateway/store/inline.py): a statement built once, run on the sqlite3 connection of an
inline write transaction, gives what SQLAlchemy gives for it — rows, their types, rowcount, stored data and
errors. Every case runs twice against equal databases, once through SQLAlchemy (``Database.write()``) and
once through the inline fast path, and the two are compared."""

from __future__ import annotations

import pytest
from sqlalchemy import (Boolean, Column, Float, Integer, MetaData, String, Table, bindparam, delete, func, select,
                        update)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.store import inline
from gateway.store.db import Database, built_once, table_insert
from gateway.store.inline import InlineConnection

md = MetaData()
item = Table(
    "inline_item", md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("code", String(32), nullable=False, unique=True),
    Column("flag", Boolean, nullable=False, default=False),
    Column("weight", Float),
    Column("n", Integer, nullable=False, default=7),
)
c = item.c

ROWS = [{"code": f"c{i}", "flag": i % 2 == 0, "weight": i / 4} for i in range(6)]  # n from its default


def _stmt(name: str, build):
    return built_once(("test inline", name), build)


def _select_in():
    return _stmt("select", lambda: select(c.code, c.flag, c.weight, c.n).where(
        c.code.in_(bindparam("codes", expanding=True)), c.n == 7).order_by(c.code).limit(3))


def _select_first():
    return _stmt("first", lambda: select(c.code).where(c.code == bindparam("x")))


CASES = [
    # (name, statement builder, params, how to read the result)
    ("insert many, default filled", lambda: table_insert(item), ROWS, "rowcount"),
    ("insert one, autoincrement key", lambda: table_insert(item), {"code": "solo", "flag": True}, "rowcount"),
    ("insert or skip, returning", lambda: _stmt("upsert", lambda: sqlite_insert(item).on_conflict_do_nothing(
        index_elements=[c.code]).returning(c.code, c.flag)),
     [{"code": "c1", "flag": True, "n": 1}, {"code": "new1", "flag": True, "n": 2},
      {"code": "new2", "flag": False, "n": 3}], "all"),
    ("select with literal, IN list and limit", _select_in, {"codes": ["c0", "c1", "c2", "c3", "zz"]}, "all"),
    ("select mappings", lambda: _stmt("select all", lambda: select(item).order_by(c.id)), None, "mappings"),
    ("select scalars", lambda: _stmt("scalars", lambda: select(c.flag).order_by(c.id)), None, "scalars"),
    ("aggregate scalar_one", lambda: _stmt("count", lambda: select(func.count()).select_from(item)), None, "scalar_one"),
    ("select first of none", _select_first, {"x": "nope"}, "first"),
    ("update IN list, bind processor, returning", lambda: _stmt("update ret", lambda: update(item).where(
        c.code.in_(bindparam("codes", expanding=True))).values(weight=bindparam("w")).returning(c.code, c.weight)),
     {"codes": ["c2", "c4"], "w": 3}, "all"),
    ("update many, rowcount", lambda: _stmt("update many", lambda: update(item).where(c.code == bindparam("b_code"))
                                             .values(n=bindparam("b_n"))),
     [{"b_code": "c0", "b_n": 10}, {"b_code": "c5", "b_n": 11}, {"b_code": "nope", "b_n": 12}], "rowcount"),
    ("delete IN list", lambda: _stmt("delete", lambda: delete(item).where(c.code.in_(bindparam("codes", expanding=True)))),
     {"codes": ["c3", "missing"]}, "rowcount"),
    ("empty IN list", _select_in, {"codes": []}, "all"),
]


def _read(result, how: str):
    if how == "rowcount":
        return result.rowcount
    if how == "all":
        return [(tuple(r), type(r[1]).__name__ if len(r) > 1 else None) for r in result.all()]
    if how == "mappings":
        return [dict(m) for m in result.mappings().all()]
    if how == "scalars":
        return [(v, type(v).__name__) for v in result.scalars().all()]
    if how == "first":
        return result.first()
    return result.scalar_one()


async def _run_cases(db: Database, inline_: bool) -> list:
    out = []
    for name, build, params, how in CASES:
        stmt = build()
        async with db.write(inline=inline_) as conn:
            assert isinstance(conn, InlineConnection) == inline_
            out.append((name, _read(await conn.execute(stmt, params), how)))
        if inline_ and not (isinstance(params, dict) and params.get("codes") == []) and name != "insert one, autoincrement key":
            keys = frozenset(params[0] if isinstance(params, list) else params or ())
            assert InlineConnection._plans.get((id(stmt), keys)) is not None, f"{name}: not run on the fast path"
    async with db.read() as conn:
        out.append(("stored", [tuple(r) for r in (await conn.execute(select(item).order_by(c.id))).all()]))
    return out


@pytest.fixture
async def dbs(tmp_path):
    made = []
    for name in ("sa", "inline"):
        db = Database(f"sqlite:///{tmp_path / name}.db")
        async with db.write() as conn:
            await conn.run_sync(md.create_all)
        made.append(db)
    yield made
    for db in made:
        await db.dispose()


async def test_inline_fast_path_gives_what_sqlalchemy_gives(dbs):
    sa_db, inline_db = dbs
    expected = await _run_cases(sa_db, False)
    got = await _run_cases(inline_db, True)
    for (name, want), (_n, have) in zip(expected, got):
        assert have == want, name
    # the cases are not trivial: defaults filled, Boolean results as bool, skipped conflicts left out
    stored = dict(expected)["stored"]
    assert [r[4] for r in stored if r[1].startswith("c")] == [10, 7, 7, 7, 11]
    assert dict(expected)["insert or skip, returning"] == [(("new1", True), "bool"), (("new2", False), "bool")]


async def test_inline_errors_are_sqlalchemy_errors_and_roll_back(dbs):
    _sa, db = dbs
    stmt = table_insert(item)
    async with db.write(inline=True) as conn:
        await conn.execute(stmt, [{"code": "a", "flag": True}])
    with pytest.raises(IntegrityError):
        async with db.write(inline=True) as conn:
            await conn.execute(stmt, [{"code": "b", "flag": True}])
            await conn.execute(stmt, [{"code": "a", "flag": False}])  # unique code
    with pytest.raises(SQLAlchemyError):  # a missing value, as SQLAlchemy refuses it
        async with db.write(inline=True) as conn:
            await conn.execute(_select_first(), {})
    async with db.read() as conn:
        assert (await conn.execute(select(c.code))).scalars().all() == ["a"]  # "b" rolled back


def test_only_statements_built_once_are_planned():
    assert id(table_insert(item)) in inline._PLANNABLE
    assert id(item.insert()) not in inline._PLANNABLE


async def test_read_rows_gives_what_the_pooled_path_gives(dbs):
    """Database.read_rows (the WADO look-up's path: a reader thread, statements planned by the inline planner)
    returns SQLAlchemy's values: Boolean columns as bool (the sqlite3 driver gives 0/1), expanding IN lists,
    literal values; an empty IN list takes the pooled path."""
    _sa, db = dbs
    async with db.write(inline=True) as conn:
        await conn.execute(table_insert(item), ROWS)
    cases = [(_select_in(), {"codes": ["c0", "c1", "c2", "zz"]}), (_select_in(), {"codes": ["c4"]}),
             (_stmt("select all", lambda: select(item).order_by(c.id)), {}), (_select_first(), {"x": "nope"}),
             (_select_in(), {"codes": []}), (select(c.code, c.flag).where(c.n == 7).order_by(c.code), {})]
    for stmt, params in cases:
        async with db.read() as conn:
            want = [dict(r) for r in (await conn.execute(stmt, params)).mappings()]
        got = await db.read_rows(stmt, params)
        assert got == want and [type(v) for r in got for v in r.values()] == [type(v) for r in want for v in r.values()]
    assert await db.read_rows(_select_in(), {"codes": ["c0", "c1"]}) == [
        {"code": "c0", "flag": True, "weight": 0.0, "n": 7}, {"code": "c1", "flag": False, "weight": 0.25, "n": 7}]
    assert any(plan is not None for plan in db._compiled.values())  # (the reader thread's path was taken)
