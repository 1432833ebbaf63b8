"""Many rows into one table in one statement: the FHIR write path's history, patient-link, search-index and
common-model rows (issue 27: ingest at hospital scale).

PostgreSQL: ``INSERT INTO t (cols) SELECT * FROM unnest($1::type[], $2::type[], ...)`` — one statement,
one column array per column, whatever the number of rows; its text depends only on the table and the
column names, so asyncpg prepares it once per connection.  An executemany (what ``conn.execute(insert,
rows)`` does on asyncpg) sends one Bind/Execute per row and the server runs the INSERT's executor once
per row: for a 500-resource transaction's 1,400 token rows it was most of the transaction's server time.
The rows stored are the same: the same columns, each value bound as its column's type (the array's element
type is the column's type; the column's bind processor, where SQLAlchemy has one, applied to each value).

SQLite: the ordinary executemany (one call into sqlite3 for all rows, which steps one prepared statement).

Rows must all have the same keys (as ``table_insert`` executemany requires of its dicts too); a column with a
Python-side default that the rows leave out, or a table this cannot plan, goes through ``table_insert``."""

from __future__ import annotations

import re

from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.db import table_insert

_COLLATE = re.compile(r"\s+COLLATE\s+.*$", re.IGNORECASE)

#: (table name, column names) -> (SQL, bind processors by position), or None: not plannable
_PLANS: dict[tuple[str, tuple[str, ...]], tuple[str, tuple] | None] = {}


def _plan(table, names: tuple[str, ...], dialect) -> tuple[str, tuple] | None:
    key = (table.name, names)
    if key in _PLANS:
        return _PLANS[key]
    plan = None
    cols = [table.c[n] for n in names] if all(n in table.c for n in names) else None
    if cols is not None and not any(c.default is not None and c.name not in names for c in table.columns):
        casts = []
        for n, c in enumerate(cols, 1):
            type_sql = _COLLATE.sub("", c.type.compile(dialect=dialect))  # collation: the column's own
            casts.append(f"${n}::{type_sql}[]")
        quote = dialect.identifier_preparer.quote
        sql = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
               f"SELECT * FROM unnest({', '.join(casts)})")
        plan = (sql, tuple(c.type.dialect_impl(dialect).bind_processor(dialect) for c in cols))
    _PLANS[key] = plan
    return plan


async def insert_rows(conn: AsyncConnection, table, rows: list[dict]) -> None:
    """Insert ``rows`` (dicts with the same keys) into ``table`` on ``conn``, in one statement on PostgreSQL."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        names = tuple(rows[0])
        plan = _plan(table, names, conn.dialect)
        if plan is not None and all(len(r) == len(names) for r in rows):
            sql, procs = plan
            try:
                arrays = tuple([r[n] for r in rows] if p is None else [p(r[n]) for r in rows]
                               for n, p in zip(names, procs))
            except KeyError:  # a row with other keys
                arrays = None
            if arrays is not None:
                await conn.exec_driver_sql(sql, arrays)
                return
    await conn.execute(table_insert(table), rows)
