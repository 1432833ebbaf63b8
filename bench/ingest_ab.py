"""Ingest A/B of one source tree (issue 27): ``--resources`` Synthea-shaped resources (tests/fhir_population.py)
through ``fhir_repo.apply_writes`` in 500-resource transactions — bench/scale.py's load, nothing else — into a
fresh store; prints wall and process-CPU rates, the rate of every tenth, and (``--profile FILE``) a cProfile.

Usage (run once per tree, alternating, e.g. a ``git archive`` copy of main and this checkout)::

    .venv/bin/python bench/ingest_ab.py TREE --resources 50000 [--database-url postgresql://...] [--profile F]
"""
import argparse
import asyncio
import cProfile
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import TestServer

ap = argparse.ArgumentParser()
ap.add_argument("tree")
ap.add_argument("--resources", type=int, default=50_000)
ap.add_argument("--database-url", default="")
ap.add_argument("--data-dir", default="")
ap.add_argument("--profile", default="")
ap.add_argument("--no-note-writes", action="store_true", help="the load as bench/scale.py did before: no ANALYZE as it grows")
ap.add_argument("--pragma", action="append", default=[], help="SQLite: PRAGMA run on every connection checkout (experiments)")
args = ap.parse_args()
sys.path.insert(0, args.tree)
sys.path.insert(0, args.tree + "/bench")

from gateway import keys  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.store import fhir_repo  # noqa: E402
from tests.fhir_population import PER_PATIENT, patient_resources  # noqa: E402


def written() -> int:
    """Bytes this process has caused to be written to storage (/proc/self/io), 0 where unknown."""
    try:
        return int(next(ln for ln in Path("/proc/self/io").read_text().splitlines()
                        if ln.startswith("write_bytes:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


async def main() -> None:
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="ingest-ab-"))
    settings = load_settings(env={}, overrides={"data_dir": tmp, "database_url": args.database_url,
                                                 "jwt_secret": "bench-" + "x" * 32, "log_level": "WARNING"})
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    db = app[keys.DB]
    if args.pragma:
        from sqlalchemy import event

        def pragmas(dbapi_conn, *_):
            cur = dbapi_conn.cursor()
            for p in args.pragma:
                cur.execute(f"PRAGMA {p}")
            cur.close()
        event.listen(db.engine.sync_engine, "checkout", pragmas)
    patients = -(-args.resources // PER_PATIENT)
    step = max(1, patients // 10)
    tenths = []
    gen = 0.0
    pr = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    tt, ct, nt, wt = t0, c0, 0, written()
    if pr:
        pr.enable()
    for start in range(0, patients, 10):
        g0 = time.process_time()
        writes = [fhir_repo.Write(r["resourceType"], r["id"], r, None, "PUT")
                  for i in range(start, min(start + 10, patients)) for r in patient_resources(i)]
        gen += time.process_time() - g0
        async with db.write() as conn:
            await fhir_repo.apply_writes(conn, writes)
        if not args.no_note_writes:
            db.note_writes(len(writes))  # as the FHIR transaction interaction does (bench/scale.py too)
        nt += len(writes)
        if (start + 10) % step < 10 or start + 10 >= patients:
            now, cnow = time.perf_counter(), time.process_time()
            wnow = written()
            tenths.append((nt, round(nt / (now - tt)), round(nt / (cnow - ct)), round((wnow - wt) / nt)))
            tt, ct, nt, wt = now, cnow, 0, wnow
    if pr:
        pr.disable()
        pr.dump_stats(args.profile)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = patients * PER_PATIENT
    server_cpu = None
    if args.database_url:  # PostgreSQL on this machine: CPU of this database's server processes (all of the run)
        async with db.read() as conn:
            pids = [r[0] for r in await conn.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
        server_cpu = 0.0
        for pid in pids:
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                server_cpu += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
    await server.close()
    print(json.dumps({"tree": args.tree, "engine": "postgresql" if args.database_url else "sqlite", "n": n,
                      "res_s": round(n / wall), "res_cpu_s": round(n / (cpu - gen)), "gen_cpu_s": round(gen, 1),
                      "server_cpu_s": server_cpu and round(server_cpu, 1),
                      "tenths_wall": [t[1] for t in tenths], "tenths_cpu": [t[2] for t in tenths],
                      "tenths_written_bytes_per_res": [t[3] for t in tenths],
                      "load": os.getloadavg()[0]}), flush=True)


asyncio.run(main())
