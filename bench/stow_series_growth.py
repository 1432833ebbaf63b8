"""Database growth while one long series is stored a few instances per request (issue 27).

Sends one ``--instances``-slice CT series (default 1,000; small synthetic images: the index, not the pixels,
is the point) to STOW-RS ``--per-request`` instances at a time (default 10) through an in-process gateway on
SQLite and on PostgreSQL, and after every ``--block`` instances (default 100) records

* the database's used bytes: SQLite ``(page_count - freelist_count) * page_size`` after a WAL checkpoint;
  PostgreSQL ``pg_database_size`` after ``VACUUM`` (what autovacuum leaves in steady state);
* the bytes of the study's FHIR ImagingStudy: current version and all stored history versions.

The figure of merit is the growth per instance, block by block: constant when every cost is linear in the
instances stored (one ImagingStudy version per request, history keeping the latest derived version), rising
block after block when each request stores another whole-study copy.

    .venv/bin/python bench/stow_series_growth.py [--instances 1000] [--per-request 10] [--engines sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import asyncpg
from sqlalchemy import func, select, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway import keys  # noqa: E402
from gateway.store import schema as s  # noqa: E402
from tests.conftest import make_settings, start_gateway  # noqa: E402
from tests.dicom_synth import ct_series, stow_body, to_bytes  # noqa: E402

PG_ADMIN = os.environ.get("FEDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
BOUNDARY = "growth-boundary-5e1d"


async def used_bytes(gw, engine: str, pg_name: str | None) -> int:
    db = gw.app[keys.DB]
    if engine == "sqlite":
        async with db.write() as conn:
            await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        async with db.read() as conn:
            pages = (await conn.execute(text("PRAGMA page_count"))).scalar_one()
            free = (await conn.execute(text("PRAGMA freelist_count"))).scalar_one()
            size = (await conn.execute(text("PRAGMA page_size"))).scalar_one()
        return (pages - free) * size
    conn = await asyncpg.connect(f"{PG_ADMIN}/{pg_name}")
    try:
        await conn.execute("VACUUM")
        return await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()


async def study_bytes(gw, study: str) -> tuple[int, int, int]:
    """(current ImagingStudy bytes, history bytes, history versions)."""
    H, R = s.fhir_history, s.fhir_resource
    async with gw.app[keys.DB].read() as conn:
        cur = (await conn.execute(select(func.length(R.c.content)).where(
            R.c.res_type == "ImagingStudy", R.c.res_id == study))).scalar_one()
        hist, n = (await conn.execute(select(func.coalesce(func.sum(func.length(H.c.content)), 0), func.count()).where(
            H.c.res_type == "ImagingStudy", H.c.res_id == study))).one()
    return int(cur), int(hist), int(n)


async def run_engine(engine: str, args: argparse.Namespace) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix=f"fedgate-growth-{engine}-"))
    pg_name = None
    if engine == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'fedgate.db'}"
    else:
        pg_name = f"fedgate_growth_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'CREATE DATABASE "{pg_name}"')
        await admin.close()
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_name}"
    gw = await start_gateway(make_settings(tmp / "data", url))
    rows: list[dict] = []
    try:
        series = ct_series(n=args.instances, patient_id="GROWTH1", patient_name="Growth^Gina", size=args.size)
        study = str(series[0].StudyInstanceUID)
        headers = gw.headers("pacs") | {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
        async with aiohttp.ClientSession() as http:
            base = await used_bytes(gw, engine, pg_name)
            prev = base
            for i in range(0, args.instances, args.per_request):
                body = stow_body([to_bytes(d) for d in series[i:i + args.per_request]], BOUNDARY)
                async with http.post(f"{gw.dicomweb}/studies", data=body, headers=headers) as r:
                    if r.status != 200:
                        raise SystemExit(f"STOW answered {r.status}: {await r.text()}")
                done = i + args.per_request
                if done % args.block == 0 or done >= args.instances:
                    now = await used_bytes(gw, engine, pg_name)
                    cur, hist, versions = await study_bytes(gw, study)
                    rows.append({"instances": done, "db_bytes": now - base, "block_per_instance": (now - prev) / args.block,
                                 "imagingstudy_bytes": cur, "history_bytes": hist, "history_versions": versions})
                    prev = now
                    print(engine, rows[-1], flush=True)
    finally:
        await gw.server.close()
        if pg_name:
            admin = await asyncpg.connect(PG_ADMIN)
            await admin.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
            await admin.close()
    return rows


def markdown(results: dict[str, list[dict]], args: argparse.Namespace, command: str) -> str:
    out = [f"## STOW of one long series: database growth per instance (issue 27) — "
           f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
           f"Machine: {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, Python "
           f"{platform.python_version()}), in-process gateway. Command: `{command}`", "",
           f"One {args.instances}-instance CT series ({args.size}×{args.size}), {args.per_request} instances per "
           f"STOW request; used database bytes after each block of {args.block} (SQLite: pages in use after a WAL "
           "checkpoint; PostgreSQL: `pg_database_size` after VACUUM).", ""]
    for engine, rows in results.items():
        out += [f"### {engine}", "",
                "| instances | DB growth (bytes) | growth per instance in the block | ImagingStudy bytes | "
                "history bytes | history versions |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['instances']} | {r['db_bytes']:,} | {r['block_per_instance']:,.0f} | "
                f"{r['imagingstudy_bytes']:,} | {r['history_bytes']:,} | {r['history_versions']} |" for r in rows]
        per = [r["block_per_instance"] for r in rows[1:]] or [rows[0]["block_per_instance"]]
        out += ["", f"Growth per instance, blocks 2…{len(rows)}: {min(per):,.0f}–{max(per):,.0f} bytes "
                f"(last / second block {per[-1] / per[0]:.2f}).", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--per-request", type=int, default=10)
    ap.add_argument("--block", type=int, default=100)
    ap.add_argument("--size", type=int, default=16, help="image rows/columns")
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    if args.block % args.per_request:
        raise SystemExit("--block must be a multiple of --per-request")
    results = {e: asyncio.run(run_engine(e, args)) for e in args.engines.split(",")}
    md = markdown(results, args, "python bench/stow_series_growth.py " + " ".join(sys.argv[1:]))
    print(md)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + md + "\n")


if __name__ == "__main__":
    main()
