"""Shared fixtures: both database engines, a real gateway on a loopback port, dev tokens.

Every test that takes ``db_url`` (directly or through ``settings``/``gateway``) runs once per engine:
SQLite (a file in tmp_path) and PostgreSQL (a fresh database on $FEDGATE_TEST_PG, default
postgresql://postgres@127.0.0.1:5432, created per test as a copy of the session's schema template
(:func:`pg_template`) and dropped after).  PostgreSQL not answering is
a test *error*, never a skip.  ``FEDGATE_TEST_ENGINES=sqlite`` narrows the run while developing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.auth import issue_dev_token
from gateway.settings import Settings, load_settings

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("FEDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
ENGINES = [e for e in os.environ.get("FEDGATE_TEST_ENGINES", "sqlite,postgresql").split(",") if e]
#: The servers tests start (``fedgate serve`` subprocesses) run one process unless a test asks for more
#: (``--processes N`` wins over the environment): the default, ``auto``, would start one per core in each.
os.environ.setdefault("FEDGATE_PROCESSES", "1")


#: Test modules that need the ``ml`` extra (torch, tritonclient): marked ``ml``. Without torch installed,
#: ``pytest -m "not ml"`` does not even import them; any other selection fails on them (never a silent skip).
ML_TEST_MODULES = frozenset({
    "test_inference_api.py", "test_inference_monitoring.py", "test_inference_triton.py", "test_training.py",
    "test_cards_preprocess.py", "test_fl.py",
    "test_console_browser.py",  # the console's models and training views run inference and a training run
})


def _ml_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "tritonclient"))


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in ML_TEST_MODULES and "not ml" in (config.getoption("markexpr") or "") \
            and not _ml_installed():
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ML_TEST_MODULES:
            item.add_marker(pytest.mark.ml)


def data_path(*parts: str) -> Path:
    """Test data: the repository's demo copy first (a clone has no ../shared), else ../shared/data."""
    local = REPO / "demo" / "data" / Path(*parts)
    if local.exists():
        return local
    return SHARED / "data" / Path(*parts)


#: The session's PostgreSQL template (see :func:`pg_template`), once built.
_PG_TEMPLATE: str | None = None


async def pg_template() -> str:
    """A PostgreSQL database holding the current schema (what start-up's one-time steps create: tables,
    indexes, the consent columns and settings), built once per test session by the same code; each test's
    database is a copy of it (``CREATE DATABASE ... TEMPLATE``), so start-up finds its schema in place
    instead of running the DDL again.  Dropped at the end of the session (``pytest_sessionfinish``)."""
    global _PG_TEMPLATE
    if _PG_TEMPLATE is None:
        from gateway.store.consent_schema import ensure_indexes
        from gateway.store.db import Database
        from gateway.store.migrate import migrate

        name = await create_pg_database(template=None, prefix="fedgate_tmpl_")
        db = Database(f"{PG_ADMIN}/{name}")
        try:
            await migrate(db)
            async with db.write() as conn:
                await ensure_indexes(conn)
        except BaseException:
            await db.dispose()
            await drop_pg_database(name)
            raise
        await db.dispose()
        if _PG_TEMPLATE is None:
            _PG_TEMPLATE = name
        else:  # built concurrently by another coroutine meanwhile
            await drop_pg_database(name)
    return _PG_TEMPLATE


async def create_pg_database(*, template: str | None | bool = True, prefix: str = "fedgate_t_") -> str:
    """A new, uniquely named database: a copy of the session's schema template (:func:`pg_template`), or
    with ``template=None`` an empty one."""
    if template is True:
        template = await pg_template()
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()
    return name


def pytest_sessionfinish(session, exitstatus):
    if _PG_TEMPLATE is not None:
        import asyncio

        asyncio.run(drop_pg_database(_PG_TEMPLATE))


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=ENGINES)
async def db_url(request, tmp_path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fedgate.db'}"
        return
    name = await create_pg_database()
    try:
        yield f"{PG_ADMIN}/{name}"
    finally:
        await drop_pg_database(name)


def make_settings(data_dir: Path, db_url: str, **overrides: Any) -> Settings:
    # processes: an in-process app is one process (the default, "auto", would size the worker pools for
    # one serving process per core)
    values = {"data_dir": data_dir, "database_url": db_url, "jwt_secret": "test-secret-" + "x" * 32,
              "log_level": "WARNING", "processes": 1}
    values.update(overrides)
    return load_settings(env={}, overrides=values)


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return make_settings(tmp_path / "data", db_url)


class GatewayClient:
    """What tests need of any running gateway (in this process or another): base URLs and dev tokens.
    Subclasses provide ``url`` and ``settings``."""

    url: str
    settings: Settings

    @property
    def fhir(self) -> str:
        return self.url + "/fhir"

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicomweb"

    def token(self, role: str = "admin", *, purpose: Any = None, attrs: dict | None = None,
              subject: str | None = None, ttl_s: int = 3600, org: str | None = None) -> str:
        return issue_dev_token(self.settings, subject=subject or f"test-{role}", roles=[role], purpose=purpose,
                               attrs=attrs, ttl_s=ttl_s, org=org)

    def headers(self, role: str = "admin", **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, **kw)}"}


@dataclass
class Gateway(GatewayClient):
    """A running gateway on a loopback port."""

    server: TestServer
    settings: Settings

    @property
    def app(self) -> web.Application:
        return self.server.app

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


async def start_gateway(settings: Settings) -> Gateway:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return Gateway(server, settings)


@pytest.fixture
async def gateway(settings) -> AsyncIterator[Gateway]:
    gw = await start_gateway(settings)
    try:
        yield gw
    finally:
        await gw.server.close()


@pytest.fixture
async def http(gateway):
    """An aiohttp ClientSession bound to nothing (use absolute URLs from ``gateway``)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session
