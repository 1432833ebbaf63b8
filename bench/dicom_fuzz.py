"""Larger DICOM mutation-fuzz run (issue 20): the suite's seeded run (tests/integration/test_dicom_corpus_fuzz.py,
96 mutants) scaled up — N mutants per seed, several seeds, one engine per run.

    .venv/bin/python bench/dicom_fuzz.py [--mutants 2000] [--seeds 20,21,22] [--db sqlite|postgresql]

Each mutant (truncation, bit flips, VR re-coding, huge lengths, nesting up to 5,000 deep) is STOWed in
requests of 6; every response must be < 500, the store must grow by exactly what was acknowledged (no
row, file or temp file of a refused part), and every stored mutant must be served (as stored, default
syntax, /metadata, /rendered, /frames/1) without a 5xx. Prints counts and the time taken; exits 1 on the
first violation (its seed is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def main(args) -> int:
    import aiohttp

    from tests.conftest import create_pg_database, drop_pg_database, make_settings, start_gateway, PG_ADMIN
    from tests.integration.test_dicom_corpus_fuzz import run_fuzz

    total = {"stored": 0, "refused": 0}
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            pg = await create_pg_database() if args.db == "postgresql" else None
            url = f"{PG_ADMIN}/{pg}" if pg else f"sqlite:///{tmp}/fedgate.db"
            gw = await start_gateway(make_settings(Path(tmp) / "data", url))
            t0 = time.perf_counter()
            try:
                async with aiohttp.ClientSession() as http:
                    counts = await run_fuzz(http, gw, seed, args.mutants)
            except AssertionError as exc:
                print(f"seed {seed}: FAILED: {str(exc)[:2000]}")
                return 1
            finally:
                await gw.server.close()
                if pg:
                    await drop_pg_database(pg)
            print(f"seed {seed}: {args.mutants} mutants, {counts['stored']} stored and served, "
                  f"{counts['refused']} refused, {time.perf_counter() - t0:.1f} s ({args.db})")
            for k in total:
                total[k] += counts[k]
    print(f"total: {total['stored']} stored, {total['refused']} refused, no 5xx, store consistent")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=2000)
    ap.add_argument("--seeds", default="20,21,22")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    sys.exit(asyncio.run(main(ap.parse_args())))
