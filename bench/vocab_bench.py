"""Vocabulary store benchmark (issue 23): `fedgate vocab load` of a generated Athena folder with a
1M-row CONCEPT_ANCESTOR (the CLI with its progress bar, in a subprocess, wall time), and what
`descendants` of a concept with > 10k descendants adds to a site cohort query — on SQLite and PostgreSQL.

Usage::

    .venv/bin/python bench/vocab_bench.py --rows 1000000 --write

The generated SNOMED-like forest: trees of branching 10, depth 4 (11,111 concepts, 11,110 descendants
of the root; 54,321 CONCEPT_ANCESTOR rows with Athena's self rows), as many as reach ``--rows``.  The
cohort site: the synthetic population of ``federation_synth`` (``--patients``) plus one condition coded
with a random concept of the first tree for every third patient.  A cohort query runs ``--repeat``
times each way (median): ``{"condition": {"code": "SCT|root", "descendants": true}}`` against the same
criterion without ``descendants`` (code alone).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.services.federation_synth import DEMO_SITES, generate, load
from gateway.store import open_database
from gateway.store.cohort import compile_cohort
from gateway.store.scope import UNRESTRICTED
from mappings.cohort.language import parse
from tests.conftest import PG_ADMIN, create_pg_database, drop_pg_database, make_settings

REPO = Path(__file__).resolve().parents[1]
SCT = "http://snomed.info/sct"
BRANCH, DEPTH = 10, 4


def tree_codes(t: int) -> list[tuple[str, str | None, int]]:
    """(code, parent code, depth) of tree ``t``, breadth first."""
    out = [(f"9{t:03d}0", None, 0)]
    level = [out[0][0]]
    for d in range(1, DEPTH + 1):
        nxt = []
        for parent in level:
            for k in range(BRANCH):
                code = f"{parent}{k}"
                out.append((code, parent, d))
                nxt.append(code)
        level = nxt
    return out


def write_athena(folder: Path, rows: int) -> tuple[int, int, str]:
    folder.mkdir(parents=True, exist_ok=True)
    per_tree = sum(BRANCH ** d * (d + 1) for d in range(DEPTH + 1))
    trees = -(-rows // per_tree)
    cid = 2_100_000_000
    n_anc = 0
    with open(folder / "CONCEPT.csv", "w") as c, open(folder / "CONCEPT_ANCESTOR.csv", "w") as a:
        c.write("concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\t"
                "concept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason\n")
        a.write("ancestor_concept_id\tdescendant_concept_id\tmin_levels_of_separation\tmax_levels_of_separation\n")
        for t in range(trees):
            ids: dict[str, int] = {}
            chain: dict[str, list[int]] = {}
            for code, parent, depth in tree_codes(t):
                cid += 1
                ids[code] = cid
                c.write(f"{cid}\tbench concept {code}\tCondition\tSNOMED\tClinical Finding\tS\t{code}\t"
                        "19700101\t20991231\t\n")
                up = [cid] + (chain[parent] if parent else [])
                chain[code] = up
                for lv, anc in enumerate(up):
                    a.write(f"{anc}\t{cid}\t{lv}\t{lv}\n")
                    n_anc += 1
                    if n_anc >= rows:
                        break
                if n_anc >= rows:
                    return cid - 2_100_000_000, n_anc, "90000"
    return cid - 2_100_000_000, n_anc, "90000"


def cli_load(folder: Path, db_url: str, data: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gateway", "vocab", "load", str(folder), "--data-dir", str(data),
                    "--database-url", db_url], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


async def cohort_times(db_url: str, data: Path, patients: int, repeat: int) -> dict:
    settings = make_settings(data, db_url)
    db = await open_database(settings)
    try:
        rows = generate(DEMO_SITES[0], patients, seed=1)
        rng = random.Random(5)
        tree0 = [c for c, _, _ in tree_codes(0)]
        tree1 = [c for c, _, _ in tree_codes(1)]
        for i, p in enumerate(rows["cm_patient"]):
            if i % 3 == 0:  # A: the root code itself (descendants add look-ups, not matches)
                rows["cm_condition"].append({"src_type": "synthetic", "src_id": f"Condition/{p['patient_id']}-a",
                                             "patient_id": p["patient_id"], "system": SCT, "code": tree0[0],
                                             "onset": "2020-01-01", "clinical_status": "active"})
            if i % 3 == 1:  # B: any code of the second tree
                rows["cm_condition"].append({"src_type": "synthetic", "src_id": f"Condition/{p['patient_id']}-b",
                                             "patient_id": p["patient_id"], "system": SCT, "code": rng.choice(tree1),
                                             "onset": "2020-01-01", "clinical_status": "active"})
        await load(db, rows)
        await db.analyze()
        out = {}
        cases = {
            "A code alone": {"code": f"{SCT}|{tree0[0]}"},
            "A descendants": {"code": f"{SCT}|{tree0[0]}", "descendants": True},
            "B explicit list": {"code": [f"{SCT}|{c}" for c in tree1]},
            "B descendants": {"code": f"{SCT}|{tree1[0]}", "descendants": True},
        }
        for label, crit in cases.items():
            node = parse({"condition": crit})
            times, n = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                async with db.read() as conn:
                    n = len((await conn.execute(compile_cohort(node, UNRESTRICTED))).all())
                times.append((time.perf_counter() - t0) * 1000)
            out[label] = (statistics.median(times), n)
        return out
    finally:
        await db.dispose()


async def run(args) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "athena"
        t0 = time.perf_counter()
        concepts, anc_rows, root = write_athena(folder, args.rows)
        gen_s = time.perf_counter() - t0
        print(f"generated {concepts} concepts, {anc_rows} CONCEPT_ANCESTOR rows in {gen_s:.1f} s", file=sys.stderr)
        for engine in args.engines.split(","):
            data = Path(tmp) / engine
            pg_name = None
            if engine == "sqlite":
                url = f"sqlite:///{data / 'fedgate.db'}"
            else:
                pg_name = await create_pg_database()
                url = f"{PG_ADMIN}/{pg_name}"
            try:
                load_s = await asyncio.to_thread(cli_load, folder, url, data)
                times = await cohort_times(url, data, args.patients, args.repeat)
            finally:
                if pg_name:
                    await drop_pg_database(pg_name)
            a0, a1, b0, b1 = (times[k] for k in ("A code alone", "A descendants", "B explicit list", "B descendants"))
            line = (f"| {engine} | {anc_rows:,} | {load_s:.1f} | {a0[0]:.2f} / {a1[0]:.2f} ({a1[1]}) | {a1[0] - a0[0]:+.2f} "
                    f"| {b0[0]:.2f} / {b1[0]:.2f} ({b1[1]}) | {b1[0] - b0[0]:+.2f} |")
            print(line, flush=True)
            lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--patients", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    lines = asyncio.run(run(args))
    if args.write:
        head = (f"\n## Vocabulary store (issue 23)\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()} "
                f"({os.cpu_count()} CPUs, {platform.python_version()}); command: "
                f"`.venv/bin/python bench/vocab_bench.py --rows {args.rows} --patients {args.patients} "
                f"--repeat {args.repeat} --write`.\n`fedgate vocab load` of a generated Athena folder (CLI in a "
                "subprocess, progress bar on, wall time incl. start-up); a site cohort query (median of "
                f"{args.repeat}, ms) with `descendants` of a root with 11,110 descendants. A: every third "
                "patient has the root code itself; code alone vs. descendants (same patients: 'added' is the "
                "hierarchy look-up). B: every third patient has a random code of another such tree; the 11,111 "
                "codes listed explicitly (no vocabulary) vs. descendants of its root (same patients). "
                "Targets: load < 120 s; descendants adds ≤ 20 ms.\n\n"
                "| engine | CONCEPT_ANCESTOR rows | load s | A: alone / descendants ms (n) | A added ms "
                "| B: explicit / descendants ms (n) | B added ms |\n|---|---|---|---|---|---|---|\n")
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
