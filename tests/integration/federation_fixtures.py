"""Helpers for the federation tests: sites with generated populations, a hub, a site in a real process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import keys
from gateway.app import create_app
from gateway.services.federation_synth import SiteProfile, generate, load, profile_keys
from gateway.store.db import Database
from gateway.store.migrate import migrate
from gateway.store.scope import AccessScope
from gateway.vocab_cli import load_demo
from tests.conftest import REPO, Gateway, GatewayClient, make_settings
from tests.procs import free_port

SECRET = "test-secret-" + "x" * 32
_K = profile_keys()
#: Purpose code → the synthetic consent profiles (federation_synth.CONSENT_DUO) whose decision is permit,
#: written by hand from DUO.md (the sites run the real DUO consent gate, issue 23):
#: GRU (DUO:0000042) permits any research; NRES (DUO:0000004) has no restriction; HMB (DUO:0000006)
#: permits health/medical/biomedical research (DUO:0000006 and below), not a general-research request;
#: DS-CVD needs a requested disease under MONDO:0004995, which these purposes do not name.
ALLOWED = {"DUO:0000042": {_K["GRU"], _K["NRES"]}, "DUO:0000006": {_K["GRU"], _K["HMB"], _K["NRES"]}}


class ProfileGate:
    """A consent gate restricting research requests to the consent profiles their purpose allows.

    The federation tests run the real DUO gate; this stand-in (same seam, ``scope_for`` →
    :class:`AccessScope`) serves the differencing test, whose point is the site's arithmetic, not DUO."""

    async def scope_for(self, requester) -> AccessScope:
        allowed: set[str] = set()
        for code in requester.purpose.codes:
            allowed |= ALLOWED.get(code, set())
        return AccessScope(False, frozenset(allowed), f"profiles {sorted(allowed)}")


class ListAudit:
    def __init__(self) -> None:
        self.records: list = []

    async def record(self, event) -> None:
        self.records.append(event)


def hub_key_pem(tmp: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    priv = tmp / "hub.pem"
    pub = tmp / "hub.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(priv), str(pub)


@dataclass
class Site:
    id: str
    url: str
    rows: dict[str, list[dict]]
    gateway: Gateway | None = None
    audit: ListAudit | None = None
    proc: subprocess.Popen | None = None
    settings: Any = None


async def populate(db_url: str, rows: dict) -> None:
    db = Database(db_url)
    try:
        await migrate(db)
        await load(db, rows)
        await load_demo(db)  # code hierarchies, as `fedgate vocab load --demo` / `fedgate demo` load them
    finally:
        await db.dispose()


def site_federation(pub_pem: str, **extra: Any) -> dict:
    return {"role": "site", "trusted_hubs": [{"id": "hub", "public_key": pub_pem}], **extra}


async def start_site(tmp: Path, profile: SiteProfile, n: int, db_url: str, pub_pem: str, **fed: Any) -> Site:
    rows = generate(profile, n, seed=7)
    await populate(db_url, rows)
    settings = make_settings(tmp / profile.name, db_url, site_id=profile.name,
                             extra={"federation": site_federation(pub_pem, **fed)})
    app = create_app(settings)  # with the real DUO consent gate
    audit = ListAudit()
    app[keys.AUDIT] = audit
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gw = Gateway(server, settings)
    return Site(profile.name, gw.url, rows, gw, audit, settings=settings)


async def start_hub(tmp: Path, db_url: str, priv_pem: str, sites: list[tuple[str, str]], deadline_s: float = 3.0,
                    *, name: str = "hub", extra: dict | None = None) -> Gateway:
    """A hub gateway (data dir ``tmp/name``, hub id "hub") fanning out to ``sites`` ((id, url) pairs);
    ``extra`` = further settings sections (e.g. ``training``)."""
    settings = make_settings(tmp / name, db_url, site_id="hub", extra={"federation": {
        "role": "hub", "hub_id": "hub", "hub_key": priv_pem, "deadline_s": deadline_s,
        "sites": [{"id": i, "url": u} for i, u in sites]}, **(extra or {})})
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return Gateway(server, settings)


async def start_site_process(tmp: Path, profile: SiteProfile, n: int, pub_pem: str) -> Site:
    """A site in its own ``fedgate serve`` process (SQLite in its own data dir)."""
    data = tmp / f"{profile.name}-proc"
    data.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{data / 'fedgate.db'}"
    rows = generate(profile, n, seed=7)
    await populate(db_url, rows)
    port = free_port()
    cfg = data / "site.toml"
    cfg.write_text(
        f'site_id = "{profile.name}"\ndata_dir = "{data}"\njwt_secret = "{SECRET}"\nport = {port}\n'
        f'log_level = "WARNING"\nvalidation_workers = 0\n\n[federation]\nrole = "site"\n'
        f'trusted_hubs = [{{id = "hub", public_key = "{pub_pem}"}}]\n')
    env = dict(os.environ, FEDGATE_CONFIG=str(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        for _ in range(150):
            if proc.poll() is not None:
                raise RuntimeError(f"site process exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        else:
            proc.kill()
            raise RuntimeError("site process did not become ready in 15 s")
    return Site(profile.name, url, rows, proc=proc)


@dataclass
class Silent:
    """A TCP peer that accepts connections and never answers (a hung site)."""

    server: asyncio.base_events.Server
    url: str
    writers: list = field(default_factory=list)

    @classmethod
    async def start(cls) -> "Silent":
        writers: list = []

        async def handle(reader, writer):
            writers.append(writer)
            try:
                await reader.read(65536)
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # the test is over: end quietly
                return

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return cls(server, f"http://127.0.0.1:{port}", writers)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()


@dataclass
class ProcGateway(GatewayClient):
    """A site gateway in its own ``fedgate serve`` process (no shared event loop or GIL with the test)."""

    settings: Any
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def start_gateway_process(tmp: Path, name: str, toml: str, *, threads: int = 1, db_url: str | None = None,
                                args: tuple[str, ...] = ()) -> ProcGateway:
    """``fedgate serve`` for site ``name`` with data dir ``tmp/name`` (SQLite there unless ``db_url``);
    ``toml`` = extra settings (top-level keys first, then sections); ``args`` = extra ``serve`` flags."""
    from tests.procs import wait_ready

    data = tmp / name
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db_url = db_url or f"sqlite:///{data / 'fedgate.db'}"
    cfg = data / "site.toml"
    cfg.write_text(f'site_id = "{name}"\ndata_dir = "{data}"\njwt_secret = "{SECRET}"\nport = {port}\n'
                   f'database_url = "{db_url}"\nlog_level = "WARNING"\n{toml}\n')
    env = dict(os.environ, FEDGATE_CONFIG=str(cfg), OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc, timeout=60)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise
    return ProcGateway(make_settings(data, db_url, site_id=name, jwt_secret=SECRET), url, proc)
