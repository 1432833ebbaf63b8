"""Soak benchmark (issue 20): mixed STOW / QIDO / WADO / FHIR traffic at a fixed concurrency for a long time.

Starts one real ``fedgate serve`` process per engine (SQLite in a temp data dir; PostgreSQL in a fresh
database on 127.0.0.1:5432), seeds a pool of patients (FHIR Patient + one DICOM study each), then runs
``--concurrency`` workers that each pick an operation at random (seeded) until ``--minutes`` have passed:

  * ``stow``       POST /dicomweb/studies, one new 64x64 CT instance of a pool patient (25 %)
  * ``qido``       GET  /dicomweb/studies?PatientID=...&limit=20 (15 %) and
                   /dicomweb/studies/{s}/instances?limit=50 (5 %)
  * ``wado``       GET  a stored instance as multipart/related application/dicom (15 %)
  * ``fhir-write`` POST /fhir/Observation for a pool patient (20 %)
  * ``fhir-read``  GET  /fhir/Observation?patient=...&_count=20 (10 %) and GET /fhir/Patient/{id} (10 %)

Per minute it records requests, errors (a status other than the expected one, or a transport error),
p50/p95 latency over all operations and per operation, and the server's RSS (sampled every 5 s from
/proc/<pid>/status; the last sample of the minute and the minute's maximum). Both engines may run at
the same time (``--engines sqlite,postgresql`` runs them concurrently, each with its own clients):
on a small machine they then share the CPUs, which the figures say.

Usage::

    .venv/bin/python bench/soak.py --engines sqlite,postgresql --minutes 30 --out /tmp/soak --write

``--out`` keeps per-minute JSON (``soak-<engine>.json``) and the plot; ``--write`` appends a section
with the tables to bench/RESULTS.md and writes the plot to bench/soak.png (matplotlib, the ``bench``
extra). ``--report-only DIR`` rebuilds the section and plot from an earlier run's JSON.
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

from tests.dicom_synth import ct_series, stow_body, to_bytes
from tests.procs import free_port, wait_ready

FEDGATE = str(Path(sys.executable).with_name("fedgate"))
PG_ADMIN = os.environ.get("FEDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
BOUNDARY = "soak-boundary-7f3a"
MIX = [("stow", 25), ("qido", 15), ("qido-instances", 5), ("wado", 15), ("fhir-write", 20),
       ("fhir-search", 10), ("fhir-read", 10)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def rss_kb(pid: int) -> int:
    """Resident set of ``pid`` and its children (``--processes`` > 1), in KiB."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Soak:
    def __init__(self, engine: str, args: argparse.Namespace):
        self.engine, self.args = engine, args
        self.rng = random.Random(args.seed + (0 if engine == "sqlite" else 1))
        self.samples: list[tuple[float, str, float, bool]] = []  # (t since start, op, ms, ok)
        self.rss: list[tuple[float, int]] = []
        self.instances: list[tuple[str, str, str]] = []
        self.studies: list[str] = []
        self.patients: list[tuple[str, str]] = []  # (DICOM PatientID, FHIR Patient id)
        self.errors: list[str] = []

    def token(self, data_dir: Path, role: str) -> str:
        return subprocess.check_output([FEDGATE, "token", "--data-dir", str(data_dir), "--role", role,
                                        "--ttl", str(int(self.args.minutes * 60 + 3600))], text=True).strip()

    async def run(self) -> dict:
        tmp = Path(tempfile.mkdtemp(prefix=f"fedgate-soak-{self.engine}-"))
        port = self.args.port_base + (0 if self.engine == "sqlite" else 1) if self.args.port_base else free_port()
        cmd = [FEDGATE, "serve", "--data-dir", str(tmp), "--port", str(port)]
        db_name = None
        if self.engine == "postgresql":
            db_name = f"fedgate_soak_{uuid.uuid4().hex[:8]}"
            conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
            await conn.execute(f'CREATE DATABASE "{db_name}"')
            await conn.close()
            cmd += ["--database-url", f"{PG_ADMIN}/{db_name}"]
        if self.args.processes:
            cmd += ["--processes", str(self.args.processes)]
        log = open(tmp.parent / f"{tmp.name}.log", "w")
        proc = subprocess.Popen(cmd, env=dict(os.environ, FEDGATE_LOG_LEVEL="WARNING"), stdout=log, stderr=log)
        self.url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(self.url, proc, timeout=120)
            self.h_pacs = {"Authorization": f"Bearer {self.token(tmp, 'pacs')}"}
            self.h_ehr = {"Authorization": f"Bearer {self.token(tmp, 'ehr-system')}"}
            self.h_read = {"Authorization": f"Bearer {self.token(tmp, 'clinician')}"}
            conn = aiohttp.TCPConnector(limit=self.args.concurrency + 4)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
                self.s = s
                await self.seed()
                self.t0 = time.monotonic()
                end = self.t0 + self.args.minutes * 60
                sampler = asyncio.create_task(self.sample_rss(proc.pid, end))
                await asyncio.gather(*(self.worker(i, end) for i in range(self.args.concurrency)))
                await sampler
            if proc.poll() is not None:
                self.errors.append(f"server exited with {proc.returncode}")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if db_name:
                conn = await asyncpg.connect(f"{PG_ADMIN}/postgres")
                await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
                await conn.close()
        return self.summary()

    async def seed(self) -> None:
        for n in range(self.args.patients):
            mrn = f"SOAK-{self.engine[:2].upper()}-{n:04d}"
            body = {"resourceType": "Patient", "identifier": [{"system": "urn:fedgate:mrn", "value": mrn}],
                    "name": [{"family": f"Soak{n}", "given": ["Test"]}], "gender": "female",
                    "birthDate": "1970-01-01"}
            async with self.s.post(self.url + "/fhir/Patient", json=body,
                                   headers={**self.h_ehr, "Content-Type": "application/fhir+json"}) as r:
                if r.status != 201:
                    raise RuntimeError(f"seed Patient: {r.status} {(await r.text())[:300]}")
                pid = (await r.json())["id"]
            self.patients.append((mrn, pid))
            await self.stow_one(mrn, record=False)

    async def stow_one(self, mrn: str, record: bool = True) -> bool:
        study = self.rng.choice(self.studies) if self.studies and self.rng.random() < 0.7 else None
        ds = ct_series(patient_id=mrn, patient_name=f"Soak^{mrn}", n=1, size=64, study_uid=study)[0]
        body = stow_body([to_bytes(ds)], BOUNDARY)
        headers = {**self.h_pacs,
                   "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
        async with self.s.post(self.url + "/dicomweb/studies", data=body, headers=headers) as r:
            await r.read()
            ok = r.status == 200
        if ok:
            self.instances.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
            if study is None:
                self.studies.append(ds.StudyInstanceUID)
        elif not record:
            raise RuntimeError(f"seed STOW: {r.status}")
        return ok

    async def op(self, name: str) -> bool:
        rng = self.rng
        if name == "stow":
            return await self.stow_one(rng.choice(self.patients)[0])
        if name == "qido":
            url, want = self.url + "/dicomweb/studies", 200
            params = {"PatientID": rng.choice(self.patients)[0], "limit": "20"}
            headers = {**self.h_read, "Accept": "application/dicom+json"}
        elif name == "qido-instances":
            url, params, headers, want = (self.url + f"/dicomweb/studies/{rng.choice(self.studies)}/instances",
                                          {"limit": "50"}, {**self.h_read, "Accept": "application/dicom+json"},
                                          200)
        elif name == "wado":
            st, se, sop = rng.choice(self.instances)
            url, params, want = (self.url + f"/dicomweb/studies/{st}/series/{se}/instances/{sop}", {}, 200)
            headers = {**self.h_read, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        elif name == "fhir-write":
            pid = rng.choice(self.patients)[1]
            body = {"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": rng.choice(["8867-4", "8480-6",
                                                                                           "29463-7"])}]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "effectiveDateTime": "2024-01-15T10:00:00Z",
                    "valueQuantity": {"value": round(rng.uniform(40, 180), 1), "unit": "1/min"}}
            async with self.s.post(self.url + "/fhir/Observation", json=body,
                                   headers={**self.h_ehr, "Content-Type": "application/fhir+json"}) as r:
                await r.read()
                return r.status == 201
        elif name == "fhir-search":
            url, params, headers, want = (self.url + "/fhir/Observation",
                                          {"patient": rng.choice(self.patients)[1], "_count": "20"},
                                          self.h_read, 200)
        else:  # fhir-read
            url, params, headers, want = (self.url + f"/fhir/Patient/{rng.choice(self.patients)[1]}", {},
                                          self.h_read, 200)
        async with self.s.get(url, params=params, headers=headers) as r:
            await r.read()
            return r.status == want

    async def worker(self, i: int, end: float) -> None:
        names = [n for n, _w in MIX]
        weights = [w for _n, w in MIX]
        while time.monotonic() < end:
            name = self.rng.choices(names, weights)[0]
            t = time.monotonic()
            try:
                ok = await self.op(name)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok = False
                if len(self.errors) < 50:
                    self.errors.append(f"{name}: {type(exc).__name__}")
            self.samples.append((t - self.t0, name, (time.monotonic() - t) * 1000, ok))

    async def sample_rss(self, pid: int, end: float) -> None:
        while time.monotonic() < end:
            self.rss.append((time.monotonic() - self.t0, rss_kb(pid)))
            await asyncio.sleep(5)

    def summary(self) -> dict:
        minutes = []
        n_min = int(self.args.minutes)
        for m in range(n_min):
            rows = [x for x in self.samples if m * 60 <= x[0] < (m + 1) * 60]
            rss = [kb for t, kb in self.rss if m * 60 <= t < (m + 1) * 60]
            lat = [ms for _t, _n, ms, _ok in rows]
            per_op = {}
            for name, _w in MIX:
                ms = [x[2] for x in rows if x[1] == name]
                per_op[name] = {"n": len(ms), "p95": round(pct(ms, 0.95), 1) if ms else None}
            minutes.append({"minute": m + 1, "requests": len(rows), "errors": sum(1 for x in rows if not x[3]),
                            "p50_ms": round(pct(lat, 0.5), 1), "p95_ms": round(pct(lat, 0.95), 1),
                            "rss_mb": round(rss[-1] / 1024, 1) if rss else None,
                            "rss_max_mb": round(max(rss) / 1024, 1) if rss else None, "per_op": per_op})
        return {"engine": self.engine, "minutes": minutes, "concurrency": self.args.concurrency,
                "instances": len(self.instances), "studies": len(self.studies),
                "patients": len(self.patients), "errors_detail": self.errors}


def verdict(r: dict) -> dict:
    mins = r["minutes"]
    k = min(5, max(1, len(mins) // 3))
    first = pct([x for m in mins[:k] for x in [m["p95_ms"]]], 0.5)
    last = pct([x for m in mins[-k:] for x in [m["p95_ms"]]], 0.5)
    warm = mins[k:] or mins
    rss = [m["rss_mb"] for m in warm if m["rss_mb"]]
    rss_mid = (max(rss) + min(rss)) / 2 if rss else float("nan")
    return {"k": k, "errors": sum(m["errors"] for m in mins), "requests": sum(m["requests"] for m in mins),
            "p95_first": first, "p95_last": last, "p95_change_pct": round(100 * (last - first) / first, 1),
            "rss_min": min(rss) if rss else None, "rss_max": max(rss) if rss else None,
            "rss_spread_pct": round(100 * (max(rss) - min(rss)) / 2 / rss_mid, 1) if rss else None}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for r in results:
        xs = [m["minute"] for m in r["minutes"]]
        axes[0].plot(xs, [m["p95_ms"] for m in r["minutes"]], marker=".", label=f"{r['engine']} p95")
        axes[0].plot(xs, [m["p50_ms"] for m in r["minutes"]], linestyle="--", label=f"{r['engine']} p50")
        axes[1].plot(xs, [m["rss_mb"] for m in r["minutes"]], marker=".", label=r["engine"])
        axes[2].plot(xs, [m["requests"] / 60 for m in r["minutes"]], marker=".", label=f"{r['engine']} req/s")
        axes[2].plot(xs, [m["errors"] for m in r["minutes"]], marker="x", linestyle="none",
                     label=f"{r['engine']} errors/min")
    axes[0].set_ylabel("latency (ms), all ops")
    axes[1].set_ylabel("server RSS (MiB)")
    axes[2].set_ylabel("throughput / errors")
    axes[2].set_xlabel("minute")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"fedgate soak: mixed STOW/QIDO/WADO/FHIR, c={results[0]['concurrency']} per engine")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def markdown(results: list[dict], command: str, concurrent: bool, png: str) -> str:
    lines = [
        f"## Soak: mixed STOW/QIDO/WADO/FHIR (issue 20) — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}); server(s) and load generator on the same host"
        + (", **both engines' servers and clients running at the same time** (they share the CPUs, so"
           " absolute latencies are higher than one engine alone would show)." if concurrent else "."),
        f"Command: `{command}`",
        "",
        "Mix per request (seeded): " + ", ".join(f"{n} {w} %" for n, w in MIX) + ". STOW = one 64×64 CT"
        " instance (70 % into an existing study); WADO = one stored instance as multipart/related"
        " application/dicom; FHIR write = POST Observation; FHIR search = Observation?patient&_count=20.",
        "",
    ]
    for r in results:
        v = verdict(r)
        lines += [f"### {r['engine']} — {v['requests']:,} requests, {v['errors']} errors, "
                  f"{r['instances']:,} instances / {r['studies']:,} studies / {r['patients']} patients at the end",
                  "",
                  f"p95 (median of per-minute p95) first {v['k']} min {v['p95_first']} ms → last {v['k']} min "
                  f"{v['p95_last']} ms ({v['p95_change_pct']:+} %); RSS after warm-up {v['rss_min']}–"
                  f"{v['rss_max']} MiB (±{v['rss_spread_pct']} % around the midpoint).",
                  "",
                  "| min | req | err | p50 ms | p95 ms | RSS MiB | " + " | ".join(f"{n} p95" for n, _w in MIX) + " |",
                  "|---" * (6 + len(MIX)) + "|"]
        for m in r["minutes"]:
            lines.append(f"| {m['minute']} | {m['requests']} | {m['errors']} | {m['p50_ms']} | {m['p95_ms']} | "
                         f"{m['rss_mb']} | " + " | ".join(str(m['per_op'][n]['p95']) for n, _w in MIX) + " |")
        if r["errors_detail"]:
            lines += ["", "Errors: " + "; ".join(r["errors_detail"][:10])]
        lines.append("")
    lines += [f"![soak plot]({png})", ""]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> list[dict]:
    engines = [e for e in args.engines.split(",") if e]
    return list(await asyncio.gather(*(Soak(e, args).run() for e in engines)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--processes", type=int, default=0, help="--processes for fedgate serve (default 1)")
    ap.add_argument("--port-base", type=int, default=0)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--out", default="/tmp/fedgate-soak")
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md, plot to bench/soak.png")
    ap.add_argument("--report-only", help="rebuild report/plot from DIR/soak-*.json of an earlier run")
    args = ap.parse_args()
    out = Path(args.report_only or args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    if args.report_only:
        results = [json.loads(p.read_text()) for p in sorted(out.glob("soak-*.json"))]
        results.sort(key=lambda r: r["engine"] != "sqlite")
        command = results[0].get("command", command)
    else:
        results = asyncio.run(amain(args))
        for r in results:
            r["command"] = command
            (out / f"soak-{r['engine']}.json").write_text(json.dumps(r, indent=1))
    concurrent = len(results) > 1
    png = REPO / "bench" / "soak.png" if args.write else out / "soak.png"
    plot(results, png)
    text = markdown(results, command, concurrent, "soak.png")
    (out / "soak.md").write_text(text)
    print(text)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
