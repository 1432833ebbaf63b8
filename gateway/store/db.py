"""Database engine wrapper: one async API over SQLite (aiosqlite) and PostgreSQL (asyncpg).

Reads use pooled connections concurrently.  Writes go through :meth:`Database.write`, which opens a
transaction (``BEGIN ... COMMIT``, rolled back on any error so nothing partial is stored).  SQLite
allows one writer at a time, so writes are serialised in-process with an asyncio lock, and across
processes (``fedgate serve --processes N``, ``fedgate import`` against a running server) by a lock
file (``fedgate.db.writelock``, flock) held for the whole write transaction: a read-modify-write
(audit chain head, FHIR version, STOW counts) of one process never interleaves with another's, and a
waiting process wakes the moment the lock is released.  Transactions begin as pysqlite begins them
(before the first write statement); ``busy_timeout`` covers writers that do not take the lock file.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, StaticPool

from gateway.store.inline import InlineConnection, Plan, Unplannable, plan_select, plannable

log = logging.getLogger(__name__)


def async_url(url: str) -> str:
    """Map a plain database URL to the async driver SQLAlchemy needs (``sqlite`` → aiosqlite,
    ``postgresql`` → asyncpg)."""
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+pysqlite"):
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        u = u.set(drivername="postgresql+asyncpg")
    return u.render_as_string(hide_password=False)


def redacted(url: str) -> str:
    """The URL with any password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


#: statements of hot paths built once (with bind parameters), by a key naming their shape (see built_once)
_BUILT: dict[tuple, object] = {}


def built_once(key: tuple, build):
    """The statement ``build()`` makes, built on the first call for ``key`` and reused after: building the
    SQLAlchemy expression objects anew for every STOW index transaction or ImagingStudy update cost more
    CPU than executing them.  ``key`` names the statement's shape (and the dialect, where ``build`` depends
    on it); only for statements whose shape comes from code, never from request values."""
    stmt = _BUILT.get(key)
    if stmt is None:
        stmt = _BUILT[key] = build()
        plannable(stmt)  # an inline SQLite transaction runs it without SQLAlchemy's per-statement machinery
    return stmt


def table_insert(table):
    """``table.insert()``, built once per table (an executemany INSERT of rows given as dicts)."""
    return built_once(("table insert", table.name), table.insert)


def _bounded_columns(table) -> tuple[tuple[str, int | None], ...]:
    """(name, length) of the table's string columns (length None: unbounded), computed once per table."""
    from sqlalchemy import String

    return built_once(("string columns", table.name), lambda: tuple(
        (c.name, c.type.length) for c in table.columns if isinstance(c.type, String)))


def fit_rows(table, rows: list[dict]) -> list[dict]:
    """Derived rows (search index, common model) made to fit their columns the same way on both engines
   : SQLite stores any value in a ``VARCHAR(n)``, PostgreSQL refuses a longer or non-text one.
    A string column gets ``str(value)`` of a number, and at most its length (the row is derived data: the
    resource itself is stored whole)."""
    cols = _bounded_columns(table)
    for row in rows:
        for name, length in cols:
            v = row.get(name)
            if v is None:
                continue
            if not isinstance(v, str):
                v = row[name] = v if isinstance(v, (bytes, bytearray)) else str(v)
            if length is not None and len(v) > length:
                row[name] = v[:length]
    return rows


async def xact_lock(conn: AsyncConnection, cls: int, key: str) -> None:
    """PostgreSQL: a transaction-scoped advisory lock on (``cls``, hash of ``key``), so that writers in
    several server processes (``processes`` > 1) that read-then-write the same thing run one after the
    other until the transaction ends (a hash collision only serialises two unrelated writers).  SQLite:
    nothing to do — its write transactions already run one at a time, across processes too (the write
    lock file, :class:`Database`)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(cls, func.hashtext(key))))


class Database:
    """An async engine plus the write discipline of its dialect."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = async_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"database_url: unsupported engine {self.dialect!r} (sqlite or postgresql)")
        kwargs: dict = {"echo": echo}
        if self.dialect == "sqlite":
            # check_same_thread off: write(inline=True) runs statements on the loop thread, not aiosqlite's
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=False,
                          # asyncpg prepares every statement; after 5 runs PostgreSQL may switch to a generic
                          # plan that ignores the search values (and drives a patient+code search from the
                          # common code, many times slower). Plan each execution with its values.
                          connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}})
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        #: SQLite: a lock file next to the database, flock()-ed around every write transaction (see _lock_file)
        db_file = make_url(self.url).database if self.dialect == "sqlite" else None
        self._lock_path = f"{db_file}.writelock" if db_file and db_file != ":memory:" else None
        #: the SQLite file read_rows' own connection opens (None: in-memory/URI databases, PostgreSQL)
        self._reader_file = db_file if db_file and db_file != ":memory:" and not db_file.startswith("file:") else None
        self._lock_fd: int | None = None
        # planner statistics: refreshed in the background as data grows (see note_writes)
        self._rows_written = 0
        self._rows_at_analyze = 0
        self._analyze_task: asyncio.Task | None = None
        # read_rows on SQLite: a reader thread with its own connection, statements compiled once
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._compiled: dict = {}
        self._sync_engine = None  # read_sync on SQLite: a synchronous engine used by the reader thread only

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection for reads (autocommit-style; no writes)."""
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def write(self, *, inline: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection inside one transaction: committed on success, rolled back on any error.

        ``inline`` (SQLite; ignored for PostgreSQL): the transaction's statements run on the calling (event
        loop) thread instead of being handed to the aiosqlite connection's thread one call at a time. Each
        statement costs 3–4 such hand-overs (cursor, execute, fetch, close: queue put, thread wake-up,
        call_soon_threadsafe, loop wake-up), which for a transaction of many small statements cost more CPU
        than SQLite's work on them (a STOW index transaction; figures in bench/RESULTS.md). Only for such
        short transactions: the loop runs the whole transaction without yielding, its COMMIT or ROLLBACK and
        the connection's return to the pool (a reset) included, so the COMMIT's WAL fsync (and an occasional
        automatic checkpoint) blocks the loop. The write lock file (taken first) means no statement waits
        for another writer (the deferred BEGIN included).
        The caller gets an :class:`~gateway.store.inline.InlineConnection`: statements built once run on the
        sqlite3 connection without SQLAlchemy's per-statement machinery.
        The inline path shadows a private method of aiosqlite (``Connection._execute``): it is taken only
        with an aiosqlite release it was checked against (:data:`INLINE_AIOSQLITE`); with any other the
        transaction runs the ordinary way (``tests/unit/test_inline_sqlite.py`` fails on such a release)."""
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock:
            locked = await self._lock_file()
            try:
                conn = await self._begin()
                driver = None
                try:
                    if inline and INLINE_OK:
                        driver = (await conn.get_raw_connection()).driver_connection
                        driver._execute = _run_inline  # shadows aiosqlite.Connection._execute (see _run_inline)
                    yield conn if driver is None else InlineConnection(conn, driver._conn)
                    await conn.commit()
                except BaseException:
                    # failed or cancelled (e.g. a background task stopped at shutdown): no SQLite write lock may
                    # outlive the transaction, or every later writer gets "database is locked"
                    try:
                        await conn.rollback()
                    except Exception:
                        await conn.invalidate()  # closing the connection releases the lock
                    raise
                finally:
                    try:
                        await conn.close()
                    finally:
                        if driver is not None:
                            del driver._execute
            finally:
                if locked:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _begin(self) -> AsyncConnection:
        """A pooled connection inside a transaction; a BEGIN interrupted by cancellation drops its connection
        (closing it releases any lock)."""
        conn = await self.engine.connect()
        try:
            await conn.begin()
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        return conn

    async def _lock_file(self) -> bool:
        """Take the database's write lock file (other server processes, ``fedgate import``), held for the
        whole write transaction.  SQLite's own lock would serialise the writes, but a writer waiting for it
        polls (sleeps of 1, 2, 5, 10, ... ms), which costs STOW group commits of several processes most of
        their gain; a blocked flock() wakes the moment the lock is released.  Uncontended it is one system
        call; contended the wait runs in a thread."""
        if self._lock_path is None:
            return False
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fd = self._lock_fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        waiter = asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
        cancelled = False
        while True:
            try:
                await asyncio.shield(waiter)
                break
            except asyncio.CancelledError:
                if waiter.done():
                    break
                cancelled = True  # the thread takes the lock regardless: wait for it, then hand it back
        if cancelled:
            if not waiter.cancelled() and waiter.exception() is None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            raise asyncio.CancelledError
        waiter.result()
        return True

    async def read_rows(self, stmt, params: dict) -> list[dict]:
        """The rows of one SELECT as dicts (for hot single-statement reads such as the WADO look-up).

        On SQLite the statement runs on a reader thread with its own read-only connection: one hand-over to
        a thread instead of the pooled aiosqlite path's four or so (checkout, cursor, execute, fetch, rollback
        on return). WAL mode: the reader
        sees every committed write, from any process. The statement is compiled once per set of parameter
        names by the inline write path's planner (:func:`gateway.store.inline.plan_select`: bind and result
        processors, expanding ``IN`` lists, SQLAlchemy's values); one it cannot plan, PostgreSQL and an
        in-memory SQLite take the pooled connection as usual."""
        path = self._reader_file
        plan = None
        if path is not None:
            key = (stmt, frozenset(params))
            plan = self._compiled.get(key, ())
            if plan == ():
                plan = plan_select(stmt, self.engine.dialect, key[1])
                if len(self._compiled) >= 256:
                    self._compiled.clear()
                self._compiled[key] = plan
        if plan is not None:
            try:
                sql, args = plan.args(params)
            except Unplannable:  # (an empty IN list)
                plan = None
        if plan is None:
            async with self.read() as conn:
                return [dict(r) for r in (await conn.execute(stmt, params)).mappings()]
        return await asyncio.get_running_loop().run_in_executor(self._reader_thread(), self._sqlite_rows, path, sql,
                                                                args, plan)

    def _reader_thread(self) -> ThreadPoolExecutor:
        """The one thread of read_rows / read_sync on SQLite (their connections live on it)."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        return self._reader

    async def read_sync(self, fn):
        """``fn(conn)`` with a synchronous SQLAlchemy ``Connection``, for a read of several statements (QIDO's
        total and page) in one hand-over: on SQLite ``fn`` runs on the reader thread of :meth:`read_rows`
        with a synchronous engine of its own over the same file (read-only connection), instead of the
        pooled aiosqlite path's three or four hand-overs per statement (checkout, cursor, execute, fetch,
        return), which were most of a QIDO request's time. Same dialect, same
        compiled-statement cache and result processing, so ``fn`` sees what the async path returns.
        Elsewhere (PostgreSQL, in-memory SQLite) ``fn`` runs on a pooled connection (``run_sync``)."""
        if self._reader_file is None:
            async with self.read() as conn:
                return await conn.run_sync(fn)
        return await asyncio.get_running_loop().run_in_executor(self._reader_thread(), self._sync_read, fn)

    def _sync_read(self, fn):  # the reader thread
        if self._sync_engine is None:
            engine = create_engine(f"sqlite:///{self._reader_file}", poolclass=StaticPool,
                                   connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(engine, "connect", _sqlite_reader_pragmas)
            self._sync_engine = engine
        with self._sync_engine.connect() as conn:
            try:
                return fn(conn)
            finally:
                conn.rollback()  # end the read transaction: the next read sees every later commit

    def _sqlite_rows(self, path: str, sql: str, args: list, plan: Plan) -> list[dict]:  # the reader thread
        if self._reader_conn is None:
            conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            conn.execute("PRAGMA busy_timeout=30000")
            self._reader_conn = conn
        cur = self._reader_conn.execute(sql, args)
        try:
            return plan.dicts(cur)
        finally:
            cur.close()

    def note_writes(self, rows: int) -> None:
        """Count written rows; when the data grew by a quarter (and ≥ 2,000 rows) since the last
        statistics refresh, run ANALYZE in the background so the planners see the real selectivity
        of the index tables (without it PostgreSQL and SQLite both drive searches from the wrong
        index after a bulk load — 20–50 ms instead of < 1 ms at 100k resources)."""
        self._rows_written += rows
        grown = self._rows_written - self._rows_at_analyze
        if grown >= max(2_000, self._rows_at_analyze // 4) and (self._analyze_task is None or self._analyze_task.done()):
            self._rows_at_analyze = self._rows_written
            self._analyze_task = asyncio.get_running_loop().create_task(self.analyze())

    def _close_reader(self) -> None:  # the reader thread
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None

    async def analyze(self) -> None:
        """Refresh planner statistics (ANALYZE; SQLite samples at most 1,000 rows per index)."""
        try:
            if self.is_sqlite:
                async with self.write() as conn:
                    await conn.exec_driver_sql("PRAGMA analysis_limit=1000")
                    await conn.exec_driver_sql("ANALYZE")
            else:
                async with self.engine.connect() as conn:
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    await conn.exec_driver_sql("ANALYZE")
        except (OSError, SQLAlchemyError) as exc:  # statistics are an optimisation: log and go on
            log.warning("ANALYZE failed: %s", type(exc).__name__)

    async def dispose(self) -> None:
        if self._analyze_task is not None and not self._analyze_task.done():
            await asyncio.wait([self._analyze_task], timeout=30)
        if self._reader is not None:
            await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
            self._reader.shutdown(wait=False)
            self._reader = None
        await self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


#: aiosqlite releases (major, minor) whose private ``Connection._execute(fn, *args, **kwargs)`` — queue ``fn``
#: for the connection's thread and await its result — and ``Connection._conn`` (the sqlite3 connection) were
#: checked for :meth:`Database.write` ``inline``.  A new release: read both again, then add it here.
INLINE_AIOSQLITE = frozenset({(0, 20), (0, 21), (0, 22)})


def aiosqlite_release() -> tuple[int, int]:
    import aiosqlite

    major, minor = aiosqlite.__version__.split(".")[:2]
    return int(major), int(minor)


#: Whether write(inline=True) may shadow aiosqlite's Connection._execute (else it is an ordinary write).
INLINE_OK = aiosqlite_release() in INLINE_AIOSQLITE


async def _run_inline(fn, *args, **kwargs):
    """aiosqlite's ``Connection._execute`` (which queues ``fn`` for the connection's own thread and awaits its
    result) for :meth:`Database.write` ``inline``: ``fn`` — a call on the connection's sqlite3 objects, opened
    with ``check_same_thread=False`` (``Database.__init__``) — runs right here. The connection's thread is idle: a write
    transaction has the connection to itself, and its previous call has returned."""
    return fn(*args, **kwargs)


def _sqlite_reader_pragmas(dbapi_conn, _record) -> None:
    """read_sync's connection: read-only (a bug writing through it fails instead of bypassing the write lock)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=1")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-65536")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - exercised by every sqlite test
    # aiosqlite's adapter exposes a sync-looking cursor through SQLAlchemy's adaptation layer.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode NORMAL does not sync the WAL at commit, so a power loss could take back the last
    # committed transactions — a STOW instance already acknowledged (its file fsync-ed, its row not) would then
    # be deleted by the start-up reconcile as a file without a row. FULL syncs the WAL at every commit (on
    # the connection's thread, once per group-committed STOW batch).
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-65536")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


__all__ = ["Database", "async_url", "redacted", "NullPool"]
