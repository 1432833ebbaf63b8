"""FHIR at hospital scale (issue 27): ingest rate, search latency by parameter type at the first page and
at page 100, and database size per resource, on a generated Synthea-shaped store.

Builds ``--resources`` resources (``tests/fhir_population.py``: 50 per patient — Patient, research Consent,
Encounters, Conditions, Procedures, Immunization, DiagnosticReports, Observations; heart rate 8867-4 is
one resource in ten) through ``fhir_repo.apply_writes`` (the write path of the FHIR API: index, common
model, patient links, consent stamps, in 500-resource transactions, each followed by ``Database.note_writes``
as in the FHIR transaction interaction: ANALYZE in the background as the store grows), then serves the app
on loopback and times, through HTTP, one search per parameter type:

* first page: ``_count=50`` (default ``_total``: nothing counted);
* page 100: the URL of the 100th page, reached by following 99 ``next`` links (cursors), timed on its own
  (only searches with ≥ 5,000 matches have one).

Each as a research analyst (DUO:0000037: the consent gate restricts to 3 of the 4 permissions) and as a
clinician (treatment: unrestricted).  Reports p50/p95 over ``--rounds`` requests, the ingest rate of every
tenth of the load (the first vs the last: decay), and the database size per resource.

Usage::

    .venv/bin/python bench/scale.py --resources 100000 [--database-url postgresql://...] [--data-dir DIR]
        [--rounds 40] [--write]

``--data-dir`` keeps the store (and, with ``--database-url``, reuses that database) so a rerun skips the load.

``--dicom-instances 10000,100000`` adds the DICOM half (``bench/scale_dicom.py``: STOW-RS ingest, QIDO-RS at
every level, WADO-RS series, the federation site cohort query, bytes per instance) on the same store, measured
at each size; ``--dicom-only`` loads the FHIR population (the DICOM patients' records) but times no FHIR search.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import keys  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.auth import issue_dev_token  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.store import fhir_repo  # noqa: E402
from tests.fhir_population import COMMON_CODE, PER_PATIENT, patient_resources  # noqa: E402

#: (label, parameter type, path, params)
SEARCHES = [
    ("Observation?code=8867-4", "token", "Observation", {"code": f"http://loinc.org|{COMMON_CODE}"}),
    ("Observation?code=8867-4&_total=accurate", "token, counted", "Observation",
     {"code": f"http://loinc.org|{COMMON_CODE}", "_total": "accurate"}),
    ("Patient?gender=female", "token", "Patient", {"gender": "female"}),
    ("Patient?name=Smith", "string", "Patient", {"name": "Smith"}),
    ("Observation?date=ge2019-01-01", "date", "Observation", {"date": "ge2019-01-01"}),
    ("Observation?subject=Patient/sp7", "reference", "Observation", {"subject": "Patient/sp7"}),
    ("Observation?value-quantity=gt150", "quantity", "Observation", {"value-quantity": "gt150"}),
    ("Observation?_id=o7-3", "_id", "Observation", {"_id": "o7-3"}),
    ("Observation?_lastUpdated=gt2000-01-01", "_lastUpdated", "Observation", {"_lastUpdated": "gt2000-01-01"}),
    ("Patient/sp7/Observation", "compartment", "Patient/sp7/Observation", {}),
]


async def load(app, n: int, tenths: list[tuple[int, float]]) -> int:
    """Write ``n`` resources (whole patients), 500 per transaction; ``tenths``: (resources, seconds) of
    each tenth of the load."""
    db = app[keys.DB]
    patients = -(-n // PER_PATIENT)
    step = max(1, patients // 10)
    done = 0
    t_tenth, n_tenth = time.perf_counter(), 0
    for start in range(0, patients, 10):
        writes = [fhir_repo.Write(r["resourceType"], r["id"], r, None, "PUT")
                  for i in range(start, min(start + 10, patients)) for r in patient_resources(i)]
        async with db.write() as conn:
            await fhir_repo.apply_writes(conn, writes)
        db.note_writes(len(writes))  # as the FHIR transaction interaction does (planner statistics kept fresh)
        done += len(writes)
        n_tenth += len(writes)
        if (start + 10) % step < 10 or start + 10 >= patients:
            tenths.append((n_tenth, time.perf_counter() - t_tenth))
            t_tenth, n_tenth = time.perf_counter(), 0
    return done


async def db_size(app, data_dir: Path) -> int:
    db = app[keys.DB]
    if db.is_sqlite:
        async with db.write() as conn:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(p.stat().st_size for p in data_dir.glob("fedgate.db*"))
    async with db.read() as conn:
        return (await conn.exec_driver_sql("SELECT pg_database_size(current_database())")).scalar_one()


async def timed(http, url: str, params, headers) -> tuple[float, dict]:
    t0 = time.perf_counter()
    async with http.get(url, params=params, headers=headers) as r:
        body = await r.json()
        assert r.status == 200, body
    return time.perf_counter() - t0, body


def _next(body: dict) -> str | None:
    return next((x["url"] for x in body.get("link", []) if x["relation"] == "next"), None)


def pcts(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1000, xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))] * 1000


async def query_only(app, path: str, params: dict, arm: str, rounds: int) -> tuple[float, float | None]:
    """p50 ms of the store query alone (``fhir_repo.search``: no HTTP, no audit) for the first page and for
    page 100 (its keyset reached by walking the pages), in the arm's consent scope."""
    from gateway.context import Purpose, Requester
    from mappings.fhir.search import parse_search

    who = (Requester("ana", frozenset({"analyst"}), purpose=Purpose("research", ("DUO:0000037",)))
           if arm == "research" else Requester("doc", frozenset({"clinician"})))
    scope = await app[keys.GATE].scope_for(who)
    parts = path.split("/")
    rtype, compartment = (parts[2], parts[1]) if len(parts) == 3 else (path, None)
    db = app[keys.DB]

    def query():
        q = parse_search(rtype, list({**params, "_count": "50"}.items()), default_count=50, max_count=1000)
        q.compartment = compartment
        return q

    async def once(q) -> tuple[float, fhir_repo.SearchResult]:
        t0 = time.perf_counter()
        async with db.read() as conn:
            res = await fhir_repo.search(conn, q, scope)
        return time.perf_counter() - t0, res

    first = [(await once(query()))[0] for _ in range(rounds)]
    q, n = query(), 1
    _, res = await once(q)
    while res.more and n < 100:
        q.after, q.position = res.last_key, q.position + len(res.matches)
        _, res = await once(q)
        n += 1
    if n < 100:
        return statistics.median(first) * 1000, None
    page100 = [(await once(q))[0] for _ in range(rounds)]
    return statistics.median(first) * 1000, statistics.median(page100) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resources", type=int, default=100_000)
    ap.add_argument("--database-url", default="")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--write", action="store_true")
    from bench import scale_dicom

    scale_dicom.add_arguments(ap)
    args = ap.parse_args()
    dicom_lines: list[str] = []
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="scale-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    marker = tmp / "scale-loaded.json"
    shape = {"resources": args.resources, "database_url": args.database_url}
    loaded = json.loads(marker.read_text()) if marker.exists() else None
    settings = load_settings(env={}, overrides={"data_dir": tmp, "database_url": args.database_url,
                                                 "jwt_secret": "bench-" + "x" * 32, "log_level": "WARNING"})
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        if loaded and loaded["shape"] == shape:
            n, tenths = loaded["n"], [tuple(t) for t in loaded["tenths"]]
        else:
            tenths: list[tuple[int, float]] = []
            n = await load(app, args.resources, tenths)
            if args.data_dir:
                marker.write_text(json.dumps({"shape": shape, "n": n, "tenths": tenths}))
        await app[keys.DB].analyze()
        size = await db_size(app, tmp)
        gated = {"Authorization": "Bearer " + issue_dev_token(
            settings, subject="ana", roles=["analyst"], purpose={"codes": ["DUO:0000037"]}, ttl_s=36000)}
        clin = {"Authorization": "Bearer " + issue_dev_token(settings, subject="doc", roles=["clinician"], ttl_s=36000)}
        base = str(server.make_url("/fhir"))
        rows = []
        async with aiohttp.ClientSession() as http:
            for label, ptype, path, params in [] if args.dicom_only else SEARCHES:
                url = f"{base}/{path}"
                for arm, h in (("research", gated), ("treatment", clin)):
                    p = {**params, "_count": "50"}
                    for _ in range(3):
                        await timed(http, url, p, h)
                    first = []
                    for _ in range(args.rounds):
                        dt, body = await timed(http, url, p, h)
                        first.append(dt)
                    page100 = None
                    nxt, k = _next(body), 1  # the URL of page k + 1
                    while nxt and k < 99:
                        _, b = await timed(http, nxt, None, h)
                        nxt, k = _next(b), k + 1
                    if nxt:
                        page100 = []
                        for _ in range(args.rounds):
                            dt, b = await timed(http, nxt, None, h)
                            page100.append(dt)
                        assert b.get("entry"), label
                    inproc = await query_only(app, path, params, arm, args.rounds)
                    rows.append((label, ptype, arm, pcts(first), pcts(page100) if page100 else None, inproc))
                    print(rows[-1], flush=True)
        if scale_dicom.sizes(args.dicom_instances):
            dicom_lines, _ = await scale_dicom.run(app, base.removesuffix("/fhir"), settings, tmp, args, n,
                                                reuse=bool(args.data_dir))
    finally:
        await server.close()
    engine = "postgresql" if args.database_url.startswith("postgres") else "sqlite"
    rates = [c / s for c, s in tenths if s > 0]
    load_s = sum(s for _, s in tenths)
    la = os.getloadavg()
    lines = [f"engine {engine}: {n:,} resources ({n // PER_PATIENT:,} patients), loaded in {load_s:.0f} s = "
             f"{n / load_s:,.0f} res/s; per tenth of the load: " + ", ".join(f"{r:,.0f}" for r in rates)
             + f" res/s (last tenth / first: {rates[-1] / rates[0]:.2f}); database {size / 2**20:,.0f} MiB = "
             f"{size / n:,.0f} bytes/resource; load average at the end {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}", "",
             "| search (`_count=50`) | type | requester | HTTP first page p50 / p95 ms | HTTP page 100 p50 / p95 ms "
             "| query only p50 ms: first page / page 100 |",
             "|---|---|---|---|---|---|"]
    for label, ptype, arm, (f50, f95), p100, (q1, q100) in rows:
        p100s = f"{p100[0]:.1f} / {p100[1]:.1f}" if p100 else "— (< 100 pages)"
        q100s = f"{q100:.1f}" if q100 is not None else "—"
        lines.append(f"| `{label}` | {ptype} | {arm} | {f50:.1f} / {f95:.1f} | {p100s} | {q1:.1f} / {q100s} |")
    print("\n".join(lines + dicom_lines))
    if args.write:
        cmd = "    .venv/bin/python bench/scale.py " + " ".join(sys.argv[1:])
        section = [f"\n## FHIR at scale (issue 27) — {engine}, {n:,} resources — "
                   f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
                   f"Machine: 2-core shared sandbox ({platform.machine()}, Python {platform.python_version()}, "
                   f"{os.cpu_count()} CPUs), other sessions' work running. Command:", "", cmd, "",
                   f"{args.rounds} requests per cell through HTTP (one client, sequential), after 3 warm-up requests. "
                   "Research: an analyst with purpose DUO:0000037 (the gate permits 3 of the 4 consent "
                   "permissions); treatment: a clinician (unrestricted). Query only: `fhir_repo.search` in process "
                   "(no HTTP, no audit record), the same consent scopes.", "", *lines, "", *dicom_lines]
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n".join(section))


if __name__ == "__main__":
    asyncio.run(main())
