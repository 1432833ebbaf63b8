"""FHIR Bulk Data ``$export`` benchmark (issue 24): resources/s end to end and the server's memory.

Starts a real ``fedgate serve`` process (SQLite, one serving process) on a fresh data directory, loads
generated patients — each a Patient, a research Consent (GRU for 4 in 5 patients, none for the rest) and
Observations — through transaction Bundles until ≥ ``--resources`` are stored, then runs system-level
exports (``_type=Patient,Observation,Consent``) as Bulk Data clients do (kick-off, polling, every file
downloaded), in three configurations:

  * analyst, research purpose GRU, consent-filtered, identified   (``[export] deidentify_roles = []``)
  * analyst, research purpose GRU, consent-filtered, de-identified (``deidentify_roles = ["analyst"]``:
    ``mappings.deid.fhir.deidentify_resource`` in the server's worker pool)
  * clinician (treatment: every patient), identified

The server is restarted between the two ``deidentify_roles`` settings (same data directory).  Throughput is
resources in the files / seconds from kick-off to the last byte downloaded.  The server's RSS (and its
worker processes') is sampled every 0.1 s from /proc during each export.

Usage::

    .venv/bin/python bench/bulk_export.py --resources 100000 --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.auth import issue_dev_token  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from tests.procs import free_port, wait_ready  # noqa: E402

SECRET = "bench-secret-" + "x" * 32
OBS_PER_PATIENT = 8
GRU = {"codes": ["DUO:0000042"]}


def patient_bundle(start: int, n: int) -> dict:
    entries = []
    for i in range(start, start + n):
        pid = f"p{i}"
        res = [{"resourceType": "Patient", "id": pid, "identifier": [{"system": "urn:bench", "value": pid}],
                "name": [{"family": f"Fam{i}", "given": ["Given"]}], "gender": "female" if i % 2 else "male",
                "birthDate": f"{1930 + i % 70}-0{1 + i % 9}-1{i % 9}",
                "address": [{"line": [f"{i} Main St"], "city": "Town", "postalCode": "12345", "state": "ST"}]}]
        if i % 5:
            res.append({"resourceType": "Consent", "id": f"c{i}", "status": "active",
                        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                              "code": "research"}]},
                        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
                        "patient": {"reference": f"Patient/{pid}"},
                        "policyRule": {"coding": [{"system": "http://purl.obolibrary.org/obo/duo", "code": "DUO:0000042"}]},
                        "provision": {"type": "permit", "purpose": [{"system": "http://purl.obolibrary.org/obo/duo",
                                                                     "code": "DUO:0000042"}]}})
        for k in range(OBS_PER_PATIENT):
            res.append({"resourceType": "Observation", "id": f"o{i}-{k}", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": f"2020-0{1 + k}-01T10:00:00Z",
                        "valueQuantity": {"value": 60 + k, "unit": "/min", "system": "http://unitsofmeasure.org",
                                          "code": "/min"},
                        "note": [{"text": f"free text about Fam{i}"}]})
        entries += [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in res]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Server:
    def __init__(self, data: Path, deid_roles: list[str]) -> None:
        self.data, self.port = data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = data.parent / f"bench-{'deid' if deid_roles else 'plain'}.toml"
        # the site policy (deid_policy) decides: "analyst=identified" for the identified run (without it, a
        # research purpose is de-identified whatever deidentify_roles says)
        policy = "" if deid_roles else "analyst=identified"
        cfg.write_text(f'jwt_secret = "{SECRET}"\ndeid_secret = "bench-deid-secret-0123456789"\n'
                       f'deid_policy = "{policy}"\n'
                       f'log_level = "WARNING"\n[export]\ndeidentify_roles = {json.dumps(deid_roles)}\n'
                       'page_size = 1000\npoll_s = 0.2\nretry_after_s = 1\n')
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--data-dir", str(data),
                                      "--port", str(self.port), "--config", str(cfg)], cwd=str(REPO),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(server: Server, target: int, token: str) -> int:
    per_patient = 2 + OBS_PER_PATIENT  # (4 in 5 have a Consent: slightly fewer)
    patients = -(-target * 10 // (per_patient * 10 - 2))
    batch = 50
    sem = asyncio.Semaphore(2)
    stored = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def one(start: int) -> None:
            nonlocal stored
            body = patient_bundle(start, min(batch, patients - start))
            async with sem, http.post(server.url + "/fhir", data=json.dumps(body), headers={
                    "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}) as r:
                assert r.status == 200, await r.text()
                stored += len(body["entry"])
        await asyncio.gather(*(one(s) for s in range(0, patients, batch)))
    return stored


async def export(server: Server, token: str) -> dict:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json", "Prefer": "respond-async"}
    samples: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            pids = [server.proc.pid] + children(server.proc.pid)
            samples.append((rss_kb(server.proc.pid), sum(rss_kb(p) for p in pids)))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        async with http.get(server.url + "/fhir/$export?_type=Patient,Observation,Consent", headers=headers) as r:
            assert r.status == 202, await r.text()
            status = r.headers["Content-Location"]
        while True:
            async with http.get(status, headers=headers) as r:
                if r.status == 200:
                    manifest = await r.json()
                    break
                assert r.status == 202, await r.text()
            await asyncio.sleep(0.2)
        t_manifest = time.perf_counter() - t0
        n = size = 0
        for item in manifest["output"]:
            async with http.get(item["url"], headers={"Authorization": headers["Authorization"]}) as r:
                async for chunk in r.content.iter_chunked(1 << 20):
                    n += chunk.count(b"\n")
                    size += len(chunk)
        total = time.perf_counter() - t0
        async with http.delete(status, headers=headers) as r:
            assert r.status == 202
    stop.set()
    await sampler
    server_rss = [s[0] for s in samples]
    all_rss = [s[1] for s in samples]
    return {"resources": n, "bytes": size, "seconds": total, "manifest_s": t_manifest, "rate": n / total,
            "rss_start_mb": server_rss[0] / 1024, "rss_peak_mb": max(server_rss) / 1024,
            "rss_end_mb": server_rss[-1] / 1024, "all_peak_mb": max(all_rss) / 1024,
            # the server's RSS at each quarter of the export's duration: flat once the caches are warm
            "rss_quarters_mb": [server_rss[min(len(server_rss) - 1, len(server_rss) * q // 4)] / 1024 for q in (1, 2, 3)],
            "withheld": (manifest.get("extension") or {}).get("https://fedgate.dev/fhir/bulk/withheld", 0)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resources", type=int, default=100_000)
    ap.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedgate-bulk-bench-"))
    data = tmp / "data"
    settings = load_settings(env={}, overrides={"data_dir": data, "jwt_secret": SECRET})
    tok = lambda role, **kw: issue_dev_token(settings, subject=f"bench-{role}", roles=[role], ttl_s=7200, **kw)  # noqa: E731
    results = {}
    try:
        server = Server(data, [])
        await wait_ready(server.url, server.proc, 60)
        t0 = time.perf_counter()
        stored = await load(server, args.resources, tok("ehr-system"))
        load_s = time.perf_counter() - t0
        print(f"loaded {stored} resources in {load_s:.1f} s", flush=True)
        results["analyst, consent, identified"] = await export(server, tok("analyst", purpose=GRU))
        results["clinician, identified"] = await export(server, tok("clinician"))
        server.stop()
        server = Server(data, ["analyst"])
        await wait_ready(server.url, server.proc, 60)
        results["analyst, consent, de-identified"] = await export(server, tok("analyst", purpose=GRU))
        server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"## FHIR Bulk Data $export (issue 24) — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, Python "
             f"{platform.python_version()}), server and client on the same host, SQLite, one serving process.",
             f"Command: `python bench/bulk_export.py --resources {args.resources}`", "",
             f"Store: {stored:,} resources (Patients, GRU Consents for 4 in 5 patients, Observations), loaded in "
             f"{load_s:.0f} s. Export: `$export?_type=Patient,Observation,Consent`, page 1,000, kick-off to last "
             "byte downloaded.", "",
             "| export | resources in files | withheld | seconds (manifest / total) | resources/s | server RSS start / peak / end | RSS at ¼ ½ ¾ of the run | peak incl. workers |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['resources']:,} | {r['withheld']} | {r['manifest_s']:.1f} / {r['seconds']:.1f} | "
                     f"{r['rate']:,.0f} | {r['rss_start_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_end_mb']:.0f} MB | "
                     f"{' / '.join(f'{x:.0f}' for x in r['rss_quarters_mb'])} MB | "
                     f"{r['all_peak_mb']:.0f} MB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    asyncio.run(main())
