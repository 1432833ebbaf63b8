"""Database.write(inline=True) shadows aiosqlite's private ``Connection._execute`` for the length
of a STOW index transaction; this pins down what that relies on, so an aiosqlite upgrade that changes it
fails here rather than in production."""

from __future__ import annotations

import inspect
import threading

import aiosqlite
from sqlalchemy import text

from gateway.store.db import INLINE_AIOSQLITE, INLINE_OK, Database, aiosqlite_release


def test_the_installed_aiosqlite_is_one_the_inline_path_was_checked_against():
    """A new aiosqlite release fails here, loudly: the inline path would silently be off (INLINE_OK false)
    until ``Connection._execute`` and ``Connection._conn`` are read again and the release is added to
    ``gateway.store.db.INLINE_AIOSQLITE``."""
    release = aiosqlite_release()
    assert release in INLINE_AIOSQLITE, (
        f"aiosqlite {aiosqlite.__version__} is not among the releases Database.write(inline=True) was checked "
        f"against ({sorted(INLINE_AIOSQLITE)}): re-check Connection._execute/_conn, then add it to INLINE_AIOSQLITE")
    assert INLINE_OK
    assert hasattr(aiosqlite.Connection, "_execute")


def test_aiosqlite_execute_is_the_one_hand_over_we_shadow():
    sig = inspect.signature(aiosqlite.Connection._execute)
    assert list(sig.parameters)[:2] == ["self", "fn"], sig
    assert inspect.iscoroutinefunction(aiosqlite.Connection._execute)


async def _threads_of_statements(db: Database, inline: bool) -> set[str]:
    """The threads the sqlite3 calls of one INSERT ran on, in a write transaction."""
    seen: set[str] = set()
    async with db.write(inline=inline) as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        shadowed = "_execute" in vars(raw)
        real = raw._execute

        async def spy(fn, *args, **kwargs):
            def traced(*a, **k):
                seen.add(threading.current_thread().name)
                return fn(*a, **k)
            return await real(traced, *args, **kwargs)

        raw._execute = spy
        try:
            await conn.execute(text("INSERT INTO t VALUES (1), (2)"))
        finally:
            if shadowed:
                raw._execute = real
            else:
                del raw._execute
    assert "_execute" not in vars(raw)  # no shadow outlives the transaction
    return seen


async def test_inline_statements_run_on_the_calling_thread_and_commit(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE t (v INTEGER)"))
        assert await _threads_of_statements(db, inline=True) == {threading.main_thread().name}
        threaded = await _threads_of_statements(db, inline=False)
        assert threaded and threading.main_thread().name not in threaded  # aiosqlite's own thread
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT sum(v) FROM t"))).scalar() == 6
    finally:
        await db.dispose()
