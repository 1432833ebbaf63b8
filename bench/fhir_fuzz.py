"""FHIR mutation fuzzing, the larger run (issue 20): tests/fhir_fuzz.py's mutants against ``fedgate serve``.

The suite runs 120 mutants per engine (seed 20); this sends ``--n`` per engine (default 3,000) for each
seed given, against a real server process per engine (SQLite in a temp dir, PostgreSQL in a fresh
database), and prints the answers by status and every failure (a 5xx, a refusal that is not an
OperationOutcome or that changed the store). Exit status 1 on any failure.

    .venv/bin/python bench/fhir_fuzz.py --engines sqlite,postgresql --n 3000 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fhir_fuzz import mutants, run
from tests.procs import free_port, wait_ready

FEDGATE = str(Path(sys.executable).with_name("fedgate"))
PG_ADMIN = os.environ.get("FEDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


async def one_engine(engine: str, seeds: list[int], n: int) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix=f"fedgate-fuzz-{engine}-"))
    port = free_port()
    cmd = [FEDGATE, "serve", "--data-dir", str(tmp), "--port", str(port)]
    db = None
    if engine == "postgresql":
        db = f"fedgate_fuzz_{uuid.uuid4().hex[:8]}"
        c = await asyncpg.connect(f"{PG_ADMIN}/postgres")
        await c.execute(f'CREATE DATABASE "{db}"')
        await c.close()
        cmd += ["--database-url", f"{PG_ADMIN}/{db}"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, FEDGATE_LOG_LEVEL="ERROR"))
    url = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    try:
        await wait_ready(url, proc, timeout=60)

        def tok(role: str) -> dict:
            t = subprocess.check_output([FEDGATE, "token", "--data-dir", str(tmp), "--role", role], text=True)
            return {"Authorization": f"Bearer {t.strip()}"}

        async with aiohttp.ClientSession() as http:
            for seed in seeds:
                t0 = time.monotonic()
                out = await run(http, url + "/fhir", tok("ehr-system"), tok("admin"), mutants(seed, n))
                print(f"{engine} seed {seed}: {n} mutants in {time.monotonic() - t0:.0f} s, accepted "
                      f"{out['accepted']}, refused {out['refused']}, by status {out['by_status']}, "
                      f"failures {len(out['failures'])}", flush=True)
                failures += [f"{engine} seed {seed} {f}" for f in out["failures"]]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        if db:
            c = await asyncpg.connect(f"{PG_ADMIN}/postgres")
            await c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            await c.close()
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seeds", default="1")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    failures: list[str] = []
    for engine in [e for e in args.engines.split(",") if e]:
        failures += asyncio.run(one_engine(engine, seeds, args.n))
    for f in failures[:100]:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
