"""Federated-training round overhead (issue 7): everything but local training, as a fraction of it.

Starts a hub and N site gateways on loopback (each with its own SQLite store, loaded through FHIR and
STOW-RS with tests/training_data.py's labelled slices), runs one training run of the small CNN
(``ct_lesion_classifier``) and reads the hub's lineage: per round ``wall_s`` (hub: send weights → all
sites answered → aggregated), ``max_train_s`` (the slowest site's local training time, measured at the
site around the torch loop) and ``overhead_s = wall_s − max_train_s`` (token signing, serialisation,
HTTP, consent-gated cohort selection, manifest, evaluation, aggregation).  Round 1 also reads and
decodes the DICOM files (later rounds use the site's pixel cache) and is reported separately.

    .venv/bin/python bench/training_bench.py --sites 3 8 [--patients 40] [--rounds 6] [--epochs 2] [--write]

All sites share this machine's cores, so local training of N sites runs concurrently on 2 cores;
the overhead fraction is what the hub and the sites add on top of that.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomweb_client.api import DICOMwebClient

from tests.conftest import make_settings, start_gateway
from tests.integration.federation_fixtures import (
    ProcGateway,
    hub_key_pem,
    site_federation,
    start_gateway_process,
    start_hub,
)
from tests.training_data import KINDS, LESION, site_population


async def start_proc_site(tmp: Path, name: str, pub: str, threads: int):
    return await start_gateway_process(tmp, name, f'[federation]\nrole = "site"\n'
                                       f'trusted_hubs = [{{id = "hub", public_key = "{pub}"}}]\n[consent]\nrefresh_s = 0\n'
                                       f'[training]\nmin_cohort = 5\n[inference]\nworker = false\n', threads=threads)


async def one(n_sites: int, patients: int, rounds: int, epochs: int, tmp: Path, processes: bool = False,
              threads: int = 1) -> dict:
    priv, pub = hub_key_pem(tmp)
    sites = []
    for i in range(n_sites):
        name = f"site-{i}"
        if processes:
            gw = await start_proc_site(tmp, name, pub, threads)
        else:
            settings = make_settings(tmp / name, f"sqlite:///{tmp / (name + '.db')}", site_id=name, extra={
                "federation": site_federation(pub), "consent": {"refresh_s": 0}, "training": {"min_cohort": 5},
                "inference": {"worker": False}})
            gw = await start_gateway(settings)
        bundle, datasets, _ = site_population(name, KINDS[i % 3], patients, seed=i)
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.fhir, json=bundle, headers=gw.headers("ehr-system")
                                 | {"Content-Type": "application/fhir+json"}) as r:
                assert r.status == 200, await r.text()
        await asyncio.to_thread(DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs")).store_instances, datasets)
        sites.append(gw)
    hub = await start_hub(tmp, f"sqlite:///{tmp / 'hub.db'}", priv, [(f"site-{i}", gw.url) for i, gw in enumerate(sites)])
    try:
        h = hub.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        body = {"architecture": "ct_lesion_classifier", "cohort": {"imaging": {"modality": "CT"}},
                "label": {"condition": {"code": f"{LESION['system']}|{LESION['code']}"}}, "rounds": rounds,
                "local_epochs": epochs, "min_sites": n_sites, "min_cohort": 5,
                "optimizer": {"name": "adam", "lr": 0.01, "batch_size": 16}}
        async with aiohttp.ClientSession() as http:
            t0 = time.perf_counter()
            async with http.post(hub.url + "/training/runs", json=body, headers=h) as r:
                run = await r.json()
            while run["state"] in ("queued", "running"):
                await asyncio.sleep(0.2)
                async with http.get(f"{hub.url}/training/runs/{run['id']}", headers=h) as r:
                    run = await r.json()
            total = time.perf_counter() - t0
        assert run["state"] == "succeeded", run.get("error")
        lin = run["lineage"]["rounds"]
        later = lin[1:] or lin
        frac = [r["overhead_s"] / r["max_train_s"] for r in later if r["max_train_s"] > 0]
        frac_ex = [(r["overhead_s"] - r["max_eval_s"]) / r["max_train_s"] for r in later if r["max_train_s"] > 0]
        n_train = sum(v["n_train"] for v in lin[0]["sites"].values())
        return {"sites": n_sites, "slices_per_site": n_train / n_sites, "rounds": rounds, "epochs": epochs,
                "round1_wall_s": lin[0]["wall_s"], "round1_overhead_s": lin[0]["overhead_s"],
                "wall_s_median": statistics.median(r["wall_s"] for r in later),
                "train_s_median": statistics.median(r["max_train_s"] for r in later),
                "overhead_s_median": statistics.median(r["overhead_s"] for r in later),
                "aggregate_ms_median": 1000 * statistics.median(r["aggregate_s"] for r in later),
                "overhead_fraction_median": statistics.median(frac),
                "overhead_ex_eval_fraction_median": statistics.median(frac_ex),
                "eval_s_median": statistics.median(r["max_eval_s"] for r in later),
                "energy_j": run["lineage"]["energy_j"], "total_s": total,
                "final_pooled": run["lineage"]["final_evaluation_pooled"]}
    finally:
        await hub.server.close()
        for gw in sites:
            if isinstance(gw, ProcGateway):
                gw.stop()
            else:
                await gw.server.close()


def table(results: list[dict]) -> str:
    rows = [("sites", "sites"), ("training slices per site", "slices_per_site"), ("rounds × local epochs", None),
            ("round 1 wall s (reads DICOM)", "round1_wall_s"), ("round 1 overhead s", "round1_overhead_s"),
            ("round wall s (median, rounds ≥ 2)", "wall_s_median"),
            ("slowest site's local training s (median)", "train_s_median"),
            ("overhead s (median)", "overhead_s_median"), ("hub aggregation ms (median)", "aggregate_ms_median"),
            ("of which: slowest site's held-out evaluation s (median)", "eval_s_median"),
            ("**overhead / local training (median)**", "overhead_fraction_median"),
            ("overhead without the held-out evaluation / local training", "overhead_ex_eval_fraction_median"),
            ("energy estimate J (whole run)", "energy_j"), ("held-out AUROC after the run (pooled)", None)]
    out = ["| metric | " + " | ".join(f"{r['sites']} sites" for r in results) + " |",
           "|---|" + "---|" * len(results)]
    for label, key in rows:
        if key is None and label.startswith("rounds"):
            vals = [f"{r['rounds']} × {r['epochs']}" for r in results]
        elif key is None:
            vals = [str(r["final_pooled"].get("auroc")) for r in results]
        else:
            vals = [f"{r[key]:.3g}" if isinstance(r[key], float) else str(r[key]) for r in results]
        out.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--processes", action="store_true", help="every site in its own fedgate serve process")
    ap.add_argument("--threads", type=int, default=1, help="--processes: torch/OpenMP threads per site process")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    results = []
    for n in a.sites:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(await one(n, a.patients, a.rounds, a.epochs, Path(tmp), a.processes, a.threads))
            print(results[-1], flush=True)
    md = table(results)
    print(md)
    if a.write:
        load = os.getloadavg()[0]
        cmd = "bench/training_bench.py " + " ".join(sys.argv[1:])
        section = (f"\n## Federated training round overhead (issue 7) — {dt.datetime.utcnow():%Y-%m-%d %H:%M} UTC\n\n"
                   f"Machine: {platform.node()} ({os.cpu_count()} cores, shared; load average {load:.1f} at the end), "
                   + ("hub in this process, every site its own `fedgate serve` process" if a.processes
                      else "hub + sites in one process") + f" on loopback, SQLite per site, CPU torch. Command: `{cmd}`.\n\n"
                   f"{md}\n")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    asyncio.run(main())
