"""Many rows into one table in one statement: the FHIR write path's history, patient-link, search-index and
common-model rows (issue 27: ingest at hospital scale).

PostgreSQL: ``INSERT INTO t (cols) SELECT * FROM unnest($1::type[], $2::type[], ...)`` — one statement,
one column array per column, whatever the number of rows; its text depends only on the table and the
column names, so asyncpg prepares it once per connection.  An executemany (what ``conn.execute(insert,
rows)`` does on asyncpg) sends one Bind/Execute per row and the server runs the INSERT's executor once
per row: for a 500-resource transaction's 1,400 token rows it was most of the transaction's server time.
The rows stored are the same: the same columns, each value bound as its column's type (the array's element
type is the column's type; the column's bind processor, where SQLAlchemy has one, applied to each value).

SQLite: one executemany of plain tuples on the sqlite3 cursor (``exec_driver_sql``), the same INSERT that
``table_insert`` compiles, without SQLAlchemy's per-row parameter processing (``construct_params`` and
the dict-to-position list of every row: about a tenth of the load's event-loop CPU).

Rows must all have the same keys (as ``table_insert`` executemany requires of its dicts too); a column with a
Python-side default that the rows leave out, or a table this cannot plan, goes through ``table_insert``."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.db import table_insert

_COLLATE = re.compile(r"\s+COLLATE\s+.*$", re.IGNORECASE)

#: (table name, column names, dialect) -> (SQL, bind processors by position), or None: not plannable
_PLANS: dict[tuple[str, tuple[str, ...], str], tuple[str, tuple] | None] = {}


def _plan(table, names: tuple[str, ...], dialect) -> tuple[str, tuple] | None:
    key = (table.name, names, dialect.name)
    if key in _PLANS:
        return _PLANS[key]
    plan = None
    cols = [table.c[n] for n in names] if all(n in table.c for n in names) else None
    if cols is not None and not any(c.default is not None and c.name not in names for c in table.columns):
        quote = dialect.identifier_preparer.quote
        head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
        if dialect.name == "postgresql":
            casts = []
            for n, c in enumerate(cols, 1):
                type_sql = _COLLATE.sub("", c.type.compile(dialect=dialect))  # collation: the column's own
                casts.append(f"${n}::{type_sql}[]")
            sql = head + f"SELECT * FROM unnest({', '.join(casts)})"
        else:
            sql = head + f"VALUES ({', '.join('?' for _ in names)})"
        plan = (sql, tuple(c.type.dialect_impl(dialect).bind_processor(dialect) for c in cols))
    _PLANS[key] = plan
    return plan


async def insert_rows(conn: AsyncConnection, table, rows: list[dict]) -> None:
    """Insert ``rows`` (dicts with the same keys) into ``table`` on ``conn``: one statement on PostgreSQL,
    one executemany of plain tuples on SQLite."""
    if not rows:
        return
    names = tuple(rows[0])
    plan = _plan(table, names, conn.dialect)
    if plan is not None and all(len(r) == len(names) for r in rows):
        sql, procs = plan
        try:
            if conn.dialect.name == "postgresql":
                params: Any = tuple([r[n] for r in rows] if p is None else [p(r[n]) for r in rows]
                                    for n, p in zip(names, procs))
            elif any(procs):
                params = [tuple(r[n] if p is None else p(r[n]) for n, p in zip(names, procs)) for r in rows]
            else:
                params = [tuple(r[n] for n in names) for r in rows]
        except KeyError:  # a row with other keys
            params = None
        if params is not None:
            await conn.exec_driver_sql(sql, params)
            return
    await conn.execute(table_insert(table), rows)
