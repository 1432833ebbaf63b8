"""Database.write on SQLite: a write transaction starts with BEGIN IMMEDIATE, and SQLite refuses that at once
("database is locked", no busy_timeout wait) on a pooled connection whose earlier use left a read statement
open while another connection committed (its snapshot is stale).  The write must still succeed."""

from __future__ import annotations

import sqlite3

from gateway.store.db import Database


async def test_a_write_succeeds_on_a_pooled_connection_with_a_stale_read_snapshot(tmp_path):
    path = tmp_path / "w.db"
    db = Database(f"sqlite:///{path}")
    try:
        async with db.write() as c:
            await c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            for i in range(5):
                await c.exec_driver_sql(f"INSERT INTO t VALUES ({i})")
        # a pooled connection given back with a read statement still open (its cursor not finished)
        conn = await db.engine.connect()
        raw = (await conn.get_raw_connection()).driver_connection
        cursor = await raw.execute("SELECT x FROM t")
        assert await cursor.fetchone() is not None
        await conn.close()
        # another process commits meanwhile: the pooled connection's snapshot is now stale
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("INSERT INTO t VALUES (99)")
        other.close()

        async with db.write() as c:
            await c.exec_driver_sql("INSERT INTO t VALUES (100)")
        async with db.read() as c:
            assert sorted((await c.exec_driver_sql("SELECT x FROM t")).scalars()) == [0, 1, 2, 3, 4, 99, 100]
    finally:
        await db.dispose()
