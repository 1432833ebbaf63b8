"""FHIR ingest and search benchmark (issue 2).

Starts a real ``fedgate serve`` process per engine, POSTs the Synthea transaction bundles replicated with
new identities (each replica renames the patient's family name and gets fresh urn:uuids, so the store
holds distinct patients) until ≥ the requested number of resources is stored, then measures search
latency at concurrency 1 for

  * ``Observation?patient=<id>&code=<system|code>``  (a random stored patient and one of its codes)
  * ``Patient?name=<prefix>``                        (a random stored family name, 4-letter prefix)

Usage::

    .venv/bin/python bench/fhir_bench.py --engines sqlite,postgresql --min-resources 100000 --write

``--write`` appends a section to bench/RESULTS.md (machine, date, command, figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import asyncpg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.procs import free_port, wait_ready
SYNTHEA = REPO / "demo" / "data" / "synthea"
FEDGATE = str(Path(sys.executable).with_name("fedgate"))
PG_ADMIN = os.environ.get("FEDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def replicate(bundle: dict, replica: int) -> dict:
    """A copy of a Synthea transaction bundle with fresh urn:uuids and a distinct family name."""
    text = json.dumps(bundle)
    for entry in bundle["entry"]:
        old = entry["fullUrl"]
        if old.startswith("urn:uuid:"):
            text = text.replace(old, f"urn:uuid:{uuid.uuid4()}")
    out = json.loads(text)
    suffix = "".join(chr(ord("a") + int(d)) for d in str(replica))
    for entry in out["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "Patient":
            for name in res.get("name", []):
                if "family" in name:
                    name["family"] = f"{name['family']}{suffix}"
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_engine(engine: str, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"fedgate-bench-{engine}-"))
    db_name = None
    cmd = [FEDGATE, "serve", "--data-dir", str(tmp), "--port", str(port := free_port())]
    if engine == "postgresql":
        db_name = f"fedgate_bench_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
        await conn.execute(f'CREATE DATABASE "{db_name}"')
        await conn.close()
        cmd += ["--database-url", f"{PG_ADMIN}/{db_name}"]
    env = dict(os.environ, FEDGATE_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc, timeout=60)
        token = subprocess.check_output([FEDGATE, "token", "--data-dir", str(tmp), "--role", "ehr-system"],
                                        text=True).strip()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
        bundles = [json.loads(p.read_text()) for p in sorted(SYNTHEA.glob("*.json"))]
        per_round = sum(len(b["entry"]) for b in bundles)
        replicas = -(-args.min_resources // per_round)
        # bodies are generated before the clock starts, so the load generator's CPU use (same host) stays low
        work = []
        for r in range(replicas):
            for b in bundles:
                body = replicate(b, r)
                work.append((body, json.dumps(body).encode()))
        patients: list[tuple[str, str]] = []  # (patient id, family)
        obs_codes: dict[str, list[str]] = {}
        stored = 0
        queue: asyncio.Queue = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)

        async with aiohttp.ClientSession() as session:
            async def worker() -> None:
                nonlocal stored
                while not queue.empty():
                    body, raw = queue.get_nowait()
                    async with session.post(url + "/fhir", data=raw, headers=headers) as r:
                        if r.status != 200:
                            raise RuntimeError(f"ingest failed: {r.status} {(await r.text())[:300]}")
                        out = await r.json()
                    stored += len(out["entry"])
                    pid = None
                    for entry, resp in zip(body["entry"], out["entry"]):
                        res = entry["resource"]
                        if res["resourceType"] == "Patient":
                            pid = resp["response"]["location"].split("/")[1]
                            patients.append((pid, res["name"][0]["family"]))
                    codes = sorted({f"{c['system']}|{c['code']}" for e in body["entry"]
                                    if e["resource"]["resourceType"] == "Observation"
                                    for c in e["resource"]["code"]["coding"][:1]})
                    if pid and codes:
                        obs_codes[pid] = codes

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            ingest_s = time.perf_counter() - t0

            rng = random.Random(7)
            read_headers = {"Authorization": headers["Authorization"]}

            async def timed(path: str, params: dict) -> float:
                t = time.perf_counter()
                async with session.get(url + "/fhir/" + path, params=params, headers=read_headers) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"search failed {r.status}: {body[:200]!r}")
                return (time.perf_counter() - t) * 1000

            with_obs = [p for p in patients if p[0] in obs_codes]
            lat_obs, lat_name = [], []
            for _ in range(args.warmup):
                pid, _f = rng.choice(with_obs)
                await timed("Observation", {"patient": pid, "code": rng.choice(obs_codes[pid])})
            for _ in range(args.queries):
                pid, _f = rng.choice(with_obs)
                lat_obs.append(await timed("Observation", {"patient": pid, "code": rng.choice(obs_codes[pid])}))
            for _ in range(args.queries):
                _pid, family = rng.choice(patients)
                lat_name.append(await timed("Patient", {"name": family[:4].lower()}))

        return {
            "engine": engine, "resources": stored, "bundles": len(work), "ingest_s": round(ingest_s, 1),
            "ingest_rps": round(stored / ingest_s), "concurrency": args.concurrency,
            "obs_p50": round(pct(lat_obs, 0.5), 1), "obs_p95": round(pct(lat_obs, 0.95), 1),
            "name_p50": round(pct(lat_name, 0.5), 1), "name_p95": round(pct(lat_name, 0.95), 1),
            "name_mean_ms": round(statistics.mean(lat_name), 1), "queries": args.queries,
        }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        if db_name:
            conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
            await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await conn.close()


def markdown(results: list[dict], command: str) -> str:
    lines = [
        f"## FHIR ingest and search (issue 2) — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}),"
        " server and load generator on the same host.",
        f"Command: `{command}`",
        "",
        "| engine | resources stored | ingest (transaction bundles, c={}) | Observation?patient&code p50 / p95 |"
        " Patient?name p50 / p95 |".format(results[0]["concurrency"]),
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['engine']} | {r['resources']:,} | {r['ingest_rps']:,} res/s ({r['ingest_s']} s) |"
                     f" {r['obs_p50']} / {r['obs_p95']} ms | {r['name_p50']} / {r['name_p95']} ms |")
    lines += ["", "Targets (SQLite): ingest ≥ 1,500 resources/s, search p95 ≤ 20 ms. Latencies are client-side"
              f" over loopback HTTP, {results[0]['queries']} queries each at c=1 after warm-up.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--min-resources", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    results = []
    for engine in args.engines.split(","):
        res = asyncio.run(run_engine(engine, args))
        print(json.dumps(res), flush=True)
        results.append(res)
    md = markdown(results, "python bench/fhir_bench.py " + " ".join(sys.argv[1:]))
    print(md)
    if args.write:
        path = REPO / "bench" / "RESULTS.md"
        if not path.exists():
            path.write_text("# Benchmark results\n\nFigures measured on the development machines; newest sections"
                            " last. Each section names its machine, date and command.\n\n")
        with path.open("a") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
