"""Federation benchmark (issue #5).

1. Cohort query at one site with N patients (default 50 000): a query joining conditions, imaging and SR
   criteria, through the running site's HTTP endpoint (token verification, consent gate, SQL, breakdowns,
   disclosure control) — p50/p95 over the repetitions.  Targets: p95 ≤ 100 ms.
2. Hub latency vs the slowest site for 1, 4 and 8 sites: every site is its own ``fedgate serve`` process
   over a copy of the same N-patient SQLite store (or the same PostgreSQL database); the hub runs in
   this process.  For each query the hub's end-to-end time is compared with the slowest site's round
   trip as the hub saw it.  Target: hub p95 ≤ slowest-site p95 + 10 ms.

    .venv/bin/python bench/federation_bench.py [--patients 50000] [--reps 40] [--engine sqlite|postgresql]
        [--sites 1,4,8] [--db URL (a store kept between runs: generated once, then reused)]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import issue_dev_token
from gateway.services.federation_synth import DEMO_SITES, generate, load
from gateway.settings import load_settings
from gateway.store.db import Database
from gateway.store.migrate import migrate

SECRET = "bench-secret-" + "z" * 32
QUERY = {"cohort": {"all": [
    {"condition": {"code": "http://snomed.info/sct|38341003"}},
    {"imaging": {"modality": "MR", "body_part": "HEART", "slice_thickness": {"max": 8}}},
    {"sr": {"same": "group", "items": [{"concept": "DCM:121071", "code": "SCT|87878005"},
                                       {"concept": "LN:10230-1", "value": {"max": 50}}]}}]},
    "breakdowns": ["sex", "age_band", "modality", "manufacturer"], "age_at": "2025-01-01"}
PURPOSE = {"codes": ["DUO:0000042"]}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def prepare(url: str, n: int) -> None:
    db = Database(url)
    try:
        await migrate(db)
        from sqlalchemy import func, select, text

        from gateway.store.schema import cm_patient

        async with db.read() as conn:
            have = (await conn.execute(select(func.count()).select_from(cm_patient))).scalar_one()
        if have:  # a store this bench prepared before (--db): reuse it as it is
            print(f"reusing the store's {have} patients", flush=True)
            return
        rows = generate(DEMO_SITES[0], n, seed=11)
        await load(db, rows)
        del rows
        if db.is_sqlite:
            async with db.write() as conn:
                await conn.execute(text("ANALYZE"))
        else:
            # VACUUM as well as ANALYZE: the store as autovacuum leaves it soon after a bulk load (the
            # visibility map set, so index-only scans read no table pages); this bench's PostgreSQL runs
            # with autovacuum off, where a freshly loaded store would stay unvacuumed
            async with db.engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.exec_driver_sql("VACUUM ANALYZE")
    finally:
        await db.dispose()


def start_site(tmp: Path, name: str, db_url: str, pub: Path) -> tuple[subprocess.Popen, str]:
    data = tmp / name
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = data / "site.toml"
    cfg.write_text(f'site_id = "{name}"\ndata_dir = "{data}"\ndatabase_url = "{db_url}"\njwt_secret = "{SECRET}"\n'
                   f'port = {port}\nlog_level = "WARNING"\nvalidation_workers = 0\n\n[federation]\nrole = "site"\n'
                   f'trusted_hubs = [{{id = "hub", public_key = "{pub}"}}]\n')
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=REPO,
                            env=dict(os.environ, FEDGATE_CONFIG=str(cfg)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(urls: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for url in urls:
            for _ in range(300):
                try:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"{url} not ready")


async def site_bench(url: str, settings, reps: int) -> dict:
    token = issue_dev_token(settings, subject="bench", roles=["analyst"], purpose=PURPOSE, ttl_s=3600)
    times, server = [], []
    async with aiohttp.ClientSession() as s:
        for i in range(reps + 3):
            t0 = time.perf_counter()
            async with s.post(url + "/federation/cohort/count", json=QUERY,
                              headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json()
                assert r.status == 200, body
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
                server.append(body["elapsed_ms"])
    return {"p50": pct(times, 50), "p95": pct(times, 95), "server_p95": pct(server, 95), "count": body["count"]}


async def hub_bench(tmp: Path, site_urls: list[tuple[str, str]], priv: Path, reps: int) -> dict:
    from aiohttp.test_utils import TestServer

    from gateway.app import create_app

    settings = load_settings(env={}, overrides={
        "data_dir": tmp / "hub", "jwt_secret": SECRET, "log_level": "WARNING", "site_id": "hub",
        "validation_workers": 0, "extra": {"federation": {
            "role": "hub", "hub_id": "hub", "hub_key": str(priv), "deadline_s": 10.0,
            "sites": [{"id": i, "url": u} for i, u in site_urls]}}})
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    token = issue_dev_token(settings, subject="bench", roles=["analyst"], purpose=PURPOSE, ttl_s=3600)
    hub_ms, slowest, overhead = [], [], []
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(reps + 2):
                t0 = time.perf_counter()
                async with s.post(str(server.make_url("/federation/query")), json=QUERY,
                                  headers={"Authorization": f"Bearer {token}"}) as r:
                    ans = await r.json()
                total = (time.perf_counter() - t0) * 1000
                assert ans["status"] == {"ok": len(site_urls)}, ans["status"]
                if i >= 2:
                    worst = max(x["elapsed_ms"] for x in ans["sites"])
                    hub_ms.append(total)
                    slowest.append(worst)
                    overhead.append(total - worst)
    finally:
        await server.close()
    return {"hub_p50": pct(hub_ms, 50), "hub_p95": pct(hub_ms, 95), "slowest_p95": pct(slowest, 95),
            "overhead_p50": pct(overhead, 50), "overhead_p95": pct(overhead, 95)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--engine", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--sites", default="1,4,8")
    ap.add_argument("--db", help="database URL of a store to keep: prepared (generated) when empty, reused as it is "
                                 "when it has patients (e.g. sqlite:////tmp/fed500k.db, or an existing PostgreSQL "
                                 "database); not dropped at the end")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedbench-"))
    procs: list[subprocess.Popen] = []
    pg_name = None
    try:
        if args.db:
            db_url = args.db
            args.engine = "sqlite" if db_url.startswith("sqlite") else "postgresql"
        elif args.engine == "sqlite":
            db_url = f"sqlite:///{tmp / 'site.db'}"
        else:
            import asyncpg

            pg_name = f"fedbench_{os.getpid()}"
            conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
            await conn.execute(f'CREATE DATABASE "{pg_name}"')
            await conn.close()
            db_url = f"postgresql://postgres@127.0.0.1:5432/{pg_name}"
        t0 = time.perf_counter()
        await prepare(db_url, args.patients)
        print(f"prepared {args.patients} patients on {args.engine} in {time.perf_counter() - t0:.1f} s", flush=True)
        key = ec.generate_private_key(ec.SECP256R1())
        priv, pub = tmp / "hub.pem", tmp / "hub.pub.pem"
        priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        counts = [int(x) for x in args.sites.split(",")]
        urls = []
        for i in range(max(counts)):
            site_db = db_url
            if args.engine == "sqlite" and i > 0:  # each site its own copy of the store
                shutil.copy(db_url.removeprefix("sqlite:///"), tmp / f"site{i}.db")
                site_db = f"sqlite:///{tmp / f'site{i}.db'}"
            proc, url = start_site(tmp, f"site-{i}", site_db, pub)
            procs.append(proc)
            urls.append((f"site-{i}", url))
        await wait_ready([u for _, u in urls])
        settings = load_settings(env={}, overrides={"data_dir": tmp / "client", "jwt_secret": SECRET})
        one = await site_bench(urls[0][1], settings, args.reps)
        print(f"site query (conditions + imaging + SR, {args.patients} patients, {args.engine}): "
              f"p50 {one['p50']:.1f} ms, p95 {one['p95']:.1f} ms (server-side p95 {one['server_p95']:.1f} ms), "
              f"released count {one['count']}", flush=True)
        for n in counts:
            res = await hub_bench(tmp, urls[:n], priv, args.reps)
            print(f"hub with {n} site(s): hub p50 {res['hub_p50']:.1f} ms, p95 {res['hub_p95']:.1f} ms; slowest site "
                  f"p95 {res['slowest_p95']:.1f} ms; hub overhead p50 {res['overhead_p50']:.1f} ms, "
                  f"p95 {res['overhead_p95']:.1f} ms; p95 gap {res['hub_p95'] - res['slowest_p95']:.1f} ms", flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if pg_name:
            import asyncpg

            conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
            await conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
            await conn.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
