"""OMOP export / import throughput on PostgreSQL (issue 8).

Fills a fresh PostgreSQL fedgate store with synthetic common-model rows (COPY straight into the
``cm_*`` tables; values drawn from the Synthea demo codes so part of them map through the vocabulary
subset), then times, with the service code the server and CLI use:

  * export: common model → OMOP 5.4 schema built from the official DDL (COPY, then primary keys,
    foreign keys and indices) — rows/s over the OMOP clinical rows written;
  * import: that schema → the common model of a second, empty store — rows/s over the OMOP rows read;
  * re-import of the unchanged schema (the incremental path: compare, nothing written).

Usage::

    .venv/bin/python bench/omop_bench.py --rows 1000000 --write

``--write`` appends a section to bench/RESULTS.md (machine, date, command, figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.context import Purpose, Requester
from gateway.services.access import NullAudit, OpenGate
from gateway.services.omop import ExportTarget, OmopService
from gateway.store import open_database
from gateway.store.db import Database
from tests.conftest import PG_ADMIN, create_pg_database, drop_pg_database, make_settings

LOINC = [("8302-2", "cm"), ("29463-7", "kg"), ("39156-5", "kg/m2"), ("8480-6", "mm[Hg]"), ("8462-4", "mm[Hg]"),
         ("718-7", "g/dL"), ("2093-3", "mg/dL"), ("72514-3", "{score}"), ("6690-2", "10*3/uL"), ("777-3", "10*3/uL")]
SNOMED_COND = ["444814009", "195662009", "10509002", "38341003", "162864005", "58150001", "15777000", "271737000"]
SNOMED_PROC = ["428191000124101", "288086009", "117015009", "168594001", "73761001"]
SCT, LN = "http://snomed.info/sct", "http://loinc.org"


def _day(rng: random.Random) -> date:
    return date(2000, 1, 1) + timedelta(days=rng.randrange(8000))


async def fill(url: str, rows: int, seed: int = 8) -> dict[str, int]:
    """COPY synthetic common-model rows: per patient 5 encounters, 10 conditions, 30 observations,
    5 procedures (51 rows/patient)."""
    rng = random.Random(seed)
    patients = max(1, -(-rows // 51))
    conn = await asyncpg.connect(url)
    try:
        pat, enc, cond, obs, proc = [], [], [], [], []
        for i in range(patients):
            pid = f"bench-{i}"
            pat.append(("fhir", f"Patient/{pid}", pid, "[]", f"{1930 + i % 80}-0{1 + i % 9}-1{i % 9}", 1930 + i % 80,
                        "male" if i % 2 else "female", None, "2106-3", "2186-5"))
            for e in range(5):
                d = _day(rng)
                enc.append(("fhir", f"Encounter/{pid}-e{e}", pid, "AMB", SCT, "185349003", "Encounter", None,
                            d.isoformat(), (d + timedelta(days=1)).isoformat()))
            for c in range(10):
                code = rng.choice(SNOMED_COND)
                cond.append(("fhir", f"Condition/{pid}-c{c}", pid, SCT, code, None, None, _day(rng).isoformat(),
                             None, "active", f"{pid}-e{c % 5}"))
            for o in range(30):
                code, unit = rng.choice(LOINC)
                obs.append(("fhir", f"Observation/{pid}-o{o}", pid, LN, code, None, None, "vital-signs",
                            round(rng.uniform(1, 200), 2), unit, None, None, None,
                            datetime(2010, 1, 1, tzinfo=UTC).isoformat(), "final", f"{pid}-e{o % 5}", None))
            for p in range(5):
                proc.append(("fhir", f"Procedure/{pid}-p{p}", pid, SCT, rng.choice(SNOMED_PROC), None, None,
                             _day(rng).isoformat(), None, "completed", f"{pid}-e{p}"))
        cols = {
            "cm_patient": ["src_type", "src_id", "patient_id", "identifiers", "birth_date", "birth_year", "sex",
                           "deceased_date", "race", "ethnicity"],
            "cm_encounter": ["src_type", "src_id", "patient_id", "class_code", "system", "code", "display", "codes",
                             "start", "end"],
            "cm_condition": ["src_type", "src_id", "patient_id", "system", "code", "display", "codes", "onset",
                             "abatement", "clinical_status", "encounter_id"],
            "cm_observation": ["src_type", "src_id", "patient_id", "system", "code", "display", "codes", "category",
                               "value_num", "unit", "value_system", "value_code", "value_text", "effective", "status",
                               "encounter_id", "parent_id"],
            "cm_procedure": ["src_type", "src_id", "patient_id", "system", "code", "display", "codes", "performed",
                             "performed_end", "status", "encounter_id"],
        }
        data = {"cm_patient": pat, "cm_encounter": enc, "cm_condition": cond, "cm_observation": obs, "cm_procedure": proc}
        for table, recs in data.items():
            await conn.copy_records_to_table(table, records=recs, columns=cols[table])
        await conn.execute("ANALYZE")
        return {t: len(r) for t, r in data.items()}
    finally:
        await conn.close()


async def run(rows: int) -> dict:
    store_a, store_b, omop = await create_pg_database(), await create_pg_database(), await create_pg_database()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"omop-bench-{os.getpid()}"
    dbs: list[Database] = []
    try:
        sa = make_settings(tmp / "a", f"{PG_ADMIN}/{store_a}")
        sb = make_settings(tmp / "b", f"{PG_ADMIN}/{store_b}")
        db_a = await open_database(sa)
        dbs.append(db_a)
        t0 = time.perf_counter()
        filled = await fill(f"{PG_ADMIN}/{store_a}", rows)
        fill_s = time.perf_counter() - t0
        svc = OmopService(db_a)
        requester = Requester("bench", frozenset({"analyst"}), None, {}, Purpose("research", ("DUO:0000042",)))
        t0 = time.perf_counter()
        rep = await svc.export(requester, ExportTarget(pg_url=f"{PG_ADMIN}/{omop}", schema="cdm"),
                               gate=OpenGate(), audit=NullAudit())
        export_s = time.perf_counter() - t0
        db_b = await open_database(sb)
        dbs.append(db_b)
        svc_b = OmopService(db_b)
        from gateway.context import SYSTEM

        t0 = time.perf_counter()
        imp = await svc_b.import_schema(SYSTEM, f"{PG_ADMIN}/{omop}", "cdm", audit=NullAudit())
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = await svc_b.import_schema(SYSTEM, f"{PG_ADMIN}/{omop}", "cdm", audit=NullAudit())
        reimport_s = time.perf_counter() - t0
        read_rows = sum(imp["source_rows"].values())
        unchanged = sum(v["unchanged"] for v in again["changes"].values())
        return {"cm_rows": sum(filled.values()), "filled": filled, "fill_s": fill_s,
                "omop_rows": rep["rows"], "export_s": export_s, "export_map_s": rep["map_s"],
                "export_rows_per_s": rep["rows"] / export_s, "import_rows": read_rows, "import_s": import_s,
                "import_rows_per_s": read_rows / import_s, "reimport_s": reimport_s,
                "reimport_rows_per_s": read_rows / reimport_s, "reimport_unchanged": unchanged,
                "counts": rep["counts"], "coverage": rep["coverage"]["coverage"]}
    finally:
        for db in dbs:
            await db.dispose()
        for name in (store_a, store_b, omop):
            await drop_pg_database(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="common-model rows to synthesise (≥ 1M for the issue)")
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    r = asyncio.run(run(args.rows))
    lines = [
        (f"- common-model rows synthesised: {r['cm_rows']:,} ({', '.join(f'{k} {v:,}' for k, v in r['filled'].items())}); "
        f"COPY fill {r['fill_s']:.1f} s"),
        (f"- export → OMOP 5.4 schema (official DDL, COPY, then PKs + FKs + indices, one transaction): "
        f"{r['omop_rows']:,} rows in {r['export_s']:.1f} s = **{r['export_rows_per_s']:,.0f} rows/s** "
        f"(read + map {r['export_map_s']:.1f} s); vocabulary coverage {r['coverage']:.1%}"),
        (f"- import OMOP → common model of an empty store: {r['import_rows']:,} rows in {r['import_s']:.1f} s = "
        f"**{r['import_rows_per_s']:,.0f} rows/s**"),
        (f"- re-import, nothing changed (incremental compare): {r['reimport_s']:.1f} s = "
        f"{r['reimport_rows_per_s']:,.0f} rows/s, {r['reimport_unchanged']:,} rows unchanged"),
    ]
    print("\n".join(lines))
    if args.write:
        head = (f"\n## OMOP export / import (issue 8)\n\nMachine: 2-core sandbox ({platform.machine()}, shared with other "
                f"engineers' work), PostgreSQL 127.0.0.1, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n"
                f"Command: `.venv/bin/python bench/omop_bench.py --rows {args.rows} --write`\n\n")
        with (Path(__file__).parent / "RESULTS.md").open("a") as f:
            f.write(head + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
