"""Consent gate overhead benchmark (issue #4).

Builds a store of ≥ 100k FHIR resources (patients × (Patient + Consent + Observations)) whose Consents
give ≥ 100 distinct effective consent profiles (DUO permission × modifiers × GS region), written
through ``fhir_repo.apply_writes`` (the same path the FHIR API uses, so each patient's effective
profile is recomputed in the write transaction).  Then serves the app on loopback and runs the same
FHIR searches, interleaved, as

* **gated**: an analyst with a research purpose (DUO:0000037 biomedical, IRB attested, location DE)
  → restricted AccessScope (``consent_profile IN (...)``), and
* **superuser**: a clinician acting for treatment → unrestricted scope (no consent clause),

reporting median latency per query and the ratio gated / superuser from the same run.

Usage::

    .venv/bin/python bench/consent_gate_bench.py [--patients 2000] [--obs 48] [--rounds 200] [--write]
        [--database-url postgresql://...] [--data-dir DIR]

Each round times one gated and one superuser request, alternating which goes first (so drift and
order effects fall on both arms alike); medians per arm and the median of the per-round paired
ratios are reported.  ``--data-dir`` keeps the store (and, with ``--database-url``, reuses that
database) so repeated runs skip the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from gateway import keys
from gateway.app import create_app
from gateway.auth import issue_dev_token
from gateway.settings import load_settings
from gateway.store import fhir_repo
from gateway.store.schema import cm_patient

DUO = "http://purl.obolibrary.org/obo/duo"
REGIONS = ["DE", "FR", "NL", "BE", "AT", "IT", "ES", "PT", "SE", "DK", "FI", "PL", "CZ", "IE", "GR",
           "HU", "RO", "BG", "HR", "SI", "SK", "LT", "LV", "EE", "LU", "MT", "CY", "NO", "IS", "CH"]
PERMS = [("DUO:0000042", []), ("DUO:0000006", []), ("DUO:0000006", ["DUO:0000021"]),
         ("DUO:0000011", []), ("DUO:0000042", ["DUO:0000046"])]
EXT = "https://fedgate.dev/fhir/StructureDefinition/duo-"


def consent(pid: str, n: int) -> dict:
    perm, mods = PERMS[n % len(PERMS)]
    region = REGIONS[(n // len(PERMS)) % len(REGIONS)]
    return {
        "resourceType": "Consent", "id": f"c-{pid}", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "policyRule": {"coding": [{"system": DUO, "code": perm}]},
        # most profiles allow the EU as a whole (so the gated analyst in DE sees most patients: the two
        # arms do comparable work); NO/IS/CH profiles do not
        "extension": [{"url": EXT + "region", "valueString": r}
                      for r in [region] + ([] if region in ("NO", "IS", "CH") else ["EU"])],
        "provision": {"type": "permit", "code": [{"coding": [{"system": DUO, "code": m}]}
                                                  for m in mods + ["DUO:0000022"]]},
    }


def resources_for(i: int, n_obs: int) -> list[dict]:
    pid = f"bp{i}"
    out = [{"resourceType": "Patient", "id": pid, "gender": "female" if i % 2 else "male",
            "birthDate": f"{1940 + i % 60}-01-01", "name": [{"family": f"Fam{i}"}],
            "identifier": [{"system": "urn:fedgate:bench", "value": pid}]},
           consent(pid, i)]
    for k in range(n_obs):
        out.append({"resourceType": "Observation", "id": f"o{i}-{k}", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4" if k % 4 == 0 else f"99{k % 4}-1"}]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "valueQuantity": {"value": 60 + k, "unit": "/min"}})
    return out


async def load(app, patients: int, n_obs: int) -> int:
    db = app[keys.DB]
    total = 0
    batch = 25
    for start in range(0, patients, batch):
        writes = []
        for i in range(start, min(start + batch, patients)):
            for r in resources_for(i, n_obs):
                writes.append(fhir_repo.Write(r["resourceType"], r["id"], r, None, "PUT"))
        async with db.write() as conn:
            await fhir_repo.apply_writes(conn, writes)
        total += len(writes)
    return total


async def load_studies(app, studies: int, tmp: Path) -> int:
    """One single-instance CT study per patient (PatientID = the FHIR Patient id, so it links)."""
    from gateway.context import SYSTEM
    from tests.dicom_synth import ct_series, write

    svc = app[keys.DICOMWEB]
    done = 0
    for start in range(0, studies, 100):
        files = []
        for i in range(start, min(start + 100, studies)):
            files += write(ct_series(patient_id=f"bp{i}", patient_name=f"Fam{i}^B", n=1, size=8), tmp / f"s{i}")
        results = await svc.bulk_import(SYSTEM, files)
        assert all(r.status in ("stored", "duplicate") for r in results), [r.reason for r in results][:3]
        done += sum(r.status == "stored" for r in results)
    return done


QUERIES = {
    "Observation?code=8867-4&_count=50": ("Observation", {"code": "http://loinc.org|8867-4", "_count": "50"}),
    "Patient?gender=female&_count=50": ("Patient", {"gender": "female", "_count": "50"}),
    "Observation?code=8867-4&_summary=count": ("Observation", {"code": "http://loinc.org|8867-4", "_summary": "count"}),
}
QIDO = {
    "QIDO studies?limit=50": ("studies", {"limit": "50"}),
    "QIDO studies?ModalitiesInStudy=CT&limit=50": ("studies", {"ModalitiesInStudy": "CT", "limit": "50"}),
    "QIDO series?limit=50": ("series", {"limit": "50"}),
    "QIDO instances?limit=50": ("instances", {"limit": "50"}),
}


async def timed(http, url, params, headers) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with http.get(url, params=params, headers=headers | {"Accept": "application/dicom+json, application/fhir+json"}) as r:
        body = await r.json() if r.status == 200 else []
        assert r.status in (200, 204), body
    dt = time.perf_counter() - t0
    if isinstance(body, list):
        return dt, int(r.headers.get("X-Total-Count", len(body)))
    return dt, body.get("total") or len(body.get("entry", []))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--obs", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--database-url", default="")
    ap.add_argument("--studies", type=int, default=0, help="also STOW this many studies and time QIDO")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--data-dir", default="", help="keep the store here and reuse it on the next run")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="time only the queries whose name contains TEXT (repeatable; default: all)")
    args = ap.parse_args()
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="consent-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    marker = tmp / "bench-loaded.json"
    shape = {"patients": args.patients, "obs": args.obs, "studies": args.studies, "database_url": args.database_url}
    loaded = json.loads(marker.read_text()) if marker.exists() else None
    settings = load_settings(env={}, overrides={"data_dir": tmp, "database_url": args.database_url,
                                                 "jwt_secret": "bench-" + "x" * 32, "log_level": "WARNING"})
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        if loaded and loaded["shape"] == shape:
            n, load_s, n_studies = loaded["resources"], loaded["load_s"], args.studies
        else:
            t0 = time.perf_counter()
            n = await load(app, args.patients, args.obs)
            load_s = time.perf_counter() - t0
            n_studies = await load_studies(app, args.studies, tmp / "dicom") if args.studies else 0
            if args.data_dir:
                marker.write_text(json.dumps({"shape": shape, "resources": n, "load_s": load_s}))
        from sqlalchemy import func, select

        async with app[keys.DB].read() as conn:
            profiles = (await conn.execute(select(func.count(func.distinct(cm_patient.c.consent_profile))))).scalar()
        # planner statistics, as the gateway refreshes them after bulk writes (without them SQLite may drive
        # the ModalitiesInStudy EXISTS from the modality index: O(studies x series) for both arms)
        await app[keys.DB].analyze()
        gated = {"Authorization": "Bearer " + issue_dev_token(
            settings, subject="ana", roles=["analyst"], purpose={"codes": ["DUO:0000037"]},
            attrs={"irb_approved": True, "location": "DE", "commercial_purpose": False}, ttl_s=36000)}
        superuser = {"Authorization": "Bearer " + issue_dev_token(settings, subject="doc", roles=["clinician"],
                                                                 ttl_s=36000)}
        base = str(server.make_url("/fhir"))
        results = {}
        async with aiohttp.ClientSession() as http:
            dweb = str(server.make_url("/dicomweb"))
            todo = [(name, f"{base}/{rtype}", params) for name, (rtype, params) in QUERIES.items()]
            if n_studies:
                todo += [(name, f"{dweb}/{level}", params) for name, (level, params) in QIDO.items()]
            if args.only:
                todo = [t for t in todo if any(o in t[0] for o in args.only)]
            for name, url, params in todo:
                for h in (gated, superuser):  # warm-up
                    for _ in range(5):
                        await timed(http, url, params, h)
                g, s = [], []
                gn = sn = 0
                for i in range(args.rounds):  # interleaved, alternating order: same conditions for both arms
                    if i % 2:
                        dt_s, sn = await timed(http, url, params, superuser)
                        dt_g, gn = await timed(http, url, params, gated)
                    else:
                        dt_g, gn = await timed(http, url, params, gated)
                        dt_s, sn = await timed(http, url, params, superuser)
                    g.append(dt_g)
                    s.append(dt_s)
                paired = statistics.median(a / b for a, b in zip(g, s))
                results[name] = (statistics.median(g) * 1000, statistics.median(s) * 1000, gn, sn, paired)
    finally:
        await server.close()
    engine = "postgresql" if args.database_url.startswith("postgres") else "sqlite"
    lines = [f"engine {engine}: {n:,} resources ({args.patients} patients), {profiles} distinct consent profiles, "
             f"loaded in {load_s:.0f} s ({n / load_s:,.0f} res/s incl. consent recompute)"
             + (f"; {n_studies} DICOM studies" if n_studies else ""), "",
             "| query | gated p50 ms | superuser p50 ms | ratio of p50 | median paired ratio | gated hits | superuser hits |",
             "|---|---|---|---|---|---|---|"]
    for name, (gm, sm, gn, sn, paired) in results.items():
        lines.append(f"| `{name}` | {gm:.2f} | {sm:.2f} | {gm / sm:.3f} | {paired:.3f} | {gn} | {sn} |")
    print("\n".join(lines))
    if args.write:
        cmd = "    .venv/bin/python bench/consent_gate_bench.py " + " ".join(sys.argv[1:])
        section = [f"\n## Consent gate overhead (issue #4) — {engine}", "",
                   f"Machine: 2-core shared sandbox ({platform.machine()}, Python {platform.python_version()}), "
                   f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Command:", "", cmd, "",
                   "Same search, interleaved (alternating which arm goes first), as an analyst with a research "
                   "purpose (gate on: `consent_profile IN (...)` on the row over the permitted profiles) vs a "
                   f"clinician acting for treatment (unrestricted scope); {args.rounds} rounds each, median latency "
                   "through HTTP, and the median of the per-round gated/superuser ratios. Other engineers' work was "
                   "running on the machine. Target: ratio ≤ 1.05.",
                   "", *lines, ""]
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n".join(section))


if __name__ == "__main__":
    asyncio.run(main())
