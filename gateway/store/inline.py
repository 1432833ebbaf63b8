"""SQLite write transactions of many small statements, run straight on the sqlite3 connection.

:meth:`gateway.store.db.Database.write` ``inline`` hands its caller an :class:`InlineConnection` instead
of the SQLAlchemy ``AsyncConnection``. Statements built with :func:`~gateway.store.db.built_once` (plain
``Table.insert()`` statements too: :func:`~gateway.store.db.table_insert`) are compiled once per set of
parameter names into SQL text, positional parameter order, bind and result processors, and then executed on the
transaction's ``sqlite3`` connection directly: no statement cache-key computation, execution context,
greenlet switch, aiosqlite call or result-object machinery per statement. For a STOW index transaction
that machinery was most of the event loop's CPU in the transaction (SQLite's own work was a small part). Any other statement (built per call, or a shape this module
does not handle) goes to the ``AsyncConnection`` as before — same connection, same transaction.

What the fast path does is what SQLAlchemy does for these statements on SQLite: the compiled SQL, bound
parameters (literal values compiled into the statement, bind processors, Python-side scalar column
defaults of INSERTs, expanding ``IN`` lists), result processors (e.g. Boolean), ``rowcount``, errors as
SQLAlchemy's ``DBAPIError`` subclasses (``IntegrityError`` ...). An executemany with RETURNING runs one
statement per parameter set, in parameter order. ``tests/unit/store/test_inline.py`` runs the same
statements both ways and compares.
"""

from __future__ import annotations

import collections
import keyword
import re
import sqlite3
from typing import Any

from sqlalchemy.exc import DBAPIError, InvalidRequestError, MultipleResultsFound, NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection

_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")

#: statement objects the fast path may plan (built once: a plan per object stays valid), by id
_PLANNABLE: dict[int, object] = {}


def plannable(stmt) -> None:
    """Mark a statement that lives as long as the process (see :func:`gateway.store.db.built_once`)."""
    _PLANNABLE[id(stmt)] = stmt


class _Plan:
    """One statement compiled for one set of parameter names."""

    __slots__ = ("sql", "names", "fixed", "required", "procs", "expanding", "by_lengths", "row", "result_procs",
                 "returns", "dml", "lastrowid")

    def __init__(self, compiled, keys: frozenset) -> None:
        self.sql: str = compiled.string
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        fixed = {}
        required = set()
        for name in self.names:
            bind = compiled.binds.get(name)
            if name in keys:
                continue
            if bind is not None and bind.required:
                required.add(name)
            elif bind is not None and bind.callable is not None:
                raise _Unplannable
            else:
                fixed[name] = compiled.params.get(name)
        for col in compiled.insert_prefetch:  # Python-side column defaults of an INSERT
            if col.key in keys:
                continue
            if col.default is None or not col.default.is_scalar:
                raise _Unplannable
            fixed[col.key] = col.default.arg
            required.discard(col.key)
        if compiled.update_prefetch:
            raise _Unplannable
        #: an INSERT whose single-row execution SQLAlchemy follows with a lastrowid fetch (inserted_primary_key):
        #: planned for executemany only
        self.lastrowid = bool(compiled.postfetch_lastrowid)
        self.fixed = fixed
        self.required = frozenset(required)
        self.procs = dict(compiled._bind_processors)
        post = set(_POSTCOMPILE.findall(self.sql))
        if post:
            expanding = {b.key for b in compiled.post_compile_params if b.expanding}
            if post - expanding or compiled.literal_execute_params:
                raise _Unplannable
        self.expanding = frozenset(post)
        self.by_lengths: dict[tuple, str] = {}
        self.returns = bool(compiled._result_columns)
        self.dml = bool(compiled.isinsert or compiled.isupdate or compiled.isdelete)
        self.row = None
        self.result_procs: tuple = ()
        if self.returns:
            keys_ = [c.keyname for c in compiled._result_columns]
            if (len(set(keys_)) != len(keys_)
                    or any(not k.isidentifier() or keyword.iskeyword(k) or k.startswith("_") for k in keys_)):
                raise _Unplannable
            self.row = collections.namedtuple("Row", keys_)
            dialect = compiled.dialect
            procs = tuple(c.type._cached_result_processor(dialect, None) for c in compiled._result_columns)
            self.result_procs = procs if any(procs) else ()

    def args(self, params: dict) -> tuple[str, list]:
        """(SQL, positional arguments) for one parameter set."""
        out = []
        procs = self.procs
        lengths: dict[str, int] = {}
        for name in self.names:
            if name in params:
                value = params[name]
            elif name in self.required:
                raise InvalidRequestError(f"A value is required for bind parameter {name!r}")
            else:
                value = self.fixed[name]
            proc = procs.get(name)
            if name in self.expanding:
                values = list(value)
                if not values:
                    raise _Unplannable  # an empty IN list: SQLAlchemy renders it specially
                lengths[name] = len(values)
                out.extend(values if proc is None else [proc(v) for v in values])
            else:
                out.append(value if proc is None or value is None else proc(value))
        if not lengths:
            return self.sql, out
        key = tuple(lengths.values())
        sql = self.by_lengths.get(key)
        if sql is None:
            if len(self.by_lengths) >= 64:
                self.by_lengths.clear()
            sql = self.by_lengths[key] = _POSTCOMPILE.sub(lambda m: ", ".join("?" * lengths[m.group(1)]), self.sql)
        return sql, out

    def _fetched(self, cursor: sqlite3.Cursor) -> list:
        fetched = cursor.fetchall()
        if self.result_procs:
            procs = self.result_procs
            return [tuple(v if p is None or v is None else p(v) for p, v in zip(procs, r)) for r in fetched]
        return fetched

    def dicts(self, cursor: sqlite3.Cursor) -> list[dict]:
        """The rows as dicts by column key (result processors applied), for :meth:`Database.read_rows`."""
        keys = self.row._fields
        return [dict(zip(keys, r)) for r in self._fetched(cursor)]

    def rows(self, cursor: sqlite3.Cursor) -> list:
        make = self.row._make
        return [make(r) for r in self._fetched(cursor)]


def plan_select(stmt, dialect, keys: frozenset) -> _Plan | None:
    """A SELECT compiled once for :meth:`Database.read_rows` (None: one SQLAlchemy must run itself)."""
    try:
        plan = _Plan(stmt.compile(dialect=dialect), keys)
    except _Unplannable:
        return None
    return plan if plan.returns and not plan.dml else None


class _Unplannable(Exception):
    """This statement (or this call's parameters) takes SQLAlchemy's own path."""


class InlineResult:
    """The part of SQLAlchemy's ``Result`` API the write paths use, over rows already fetched."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list, rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self):
        return iter(self._rows)

    def all(self) -> list:
        return list(self._rows)

    fetchall = all

    def first(self):
        return self._rows[0] if self._rows else None

    def one(self):
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0]

    def scalar(self):
        return self._rows[0][0] if self._rows else None

    def scalar_one(self):
        return self.one()[0]

    def scalars(self) -> "InlineResult":
        return InlineResult([r[0] for r in self._rows], self.rowcount)

    def mappings(self) -> "InlineResult":
        return InlineResult([r._asdict() for r in self._rows], self.rowcount)


class InlineConnection:
    """An ``AsyncConnection`` stand-in for one inline SQLite write transaction (see the module docstring);
    everything but :meth:`execute` is the ``AsyncConnection``'s."""

    _plans: dict[tuple, _Plan | None] = {}

    def __init__(self, conn: AsyncConnection, raw: sqlite3.Connection) -> None:
        self._conn = conn
        self._raw = raw
        self.dialect = conn.dialect

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def execute(self, stmt, params=None):
        if id(stmt) in _PLANNABLE:
            many = isinstance(params, list)
            if not many or params:
                try:
                    return self._run(stmt, params, many)
                except _Unplannable:
                    pass
        return await self._conn.execute(stmt, params)

    def _plan(self, stmt, keys: frozenset) -> _Plan:
        cache_key = (id(stmt), keys)
        try:
            plan = self._plans[cache_key]
        except KeyError:
            try:
                compiled = stmt.compile(dialect=self.dialect, column_keys=sorted(keys))
                plan = _Plan(compiled, keys)
            except _Unplannable:
                plan = None
            if len(self._plans) >= 4096:
                self._plans.clear()
            self._plans[cache_key] = plan
        if plan is None:
            raise _Unplannable
        return plan

    def _run(self, stmt, params, many: bool) -> InlineResult:
        plan = self._plan(stmt, frozenset(params[0] if many else params or ()))
        if plan.lastrowid and not many:
            raise _Unplannable
        sets = [plan.args(p) for p in params] if many else [plan.args(params or {})]
        raw = self._raw
        sql = sets[0][0]
        try:
            if many and not plan.returns and not plan.expanding:
                cur = raw.executemany(sql, [a for _s, a in sets])
                try:
                    return InlineResult([], cur.rowcount)
                finally:
                    cur.close()
            rows: list = []
            count = 0
            for sql, args in sets:
                cur = raw.execute(sql, args)
                try:
                    if plan.returns:
                        rows.extend(plan.rows(cur))
                    count += max(cur.rowcount, 0)
                finally:
                    cur.close()
            return InlineResult(rows, count if plan.dml else -1)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc


#: public names for :meth:`gateway.store.db.Database.read_rows`
Plan = _Plan
Unplannable = _Unplannable
