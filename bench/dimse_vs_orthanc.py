"""DIMSE: fedgate vs Orthanc's own DIMSE receive (issue 25), same files, one after the other in one run.

C-STORE throughput: DCMTK ``storescu`` of N synthetic 512x512 CT instances (16-bit, ≈ 514 KB each) over 1
association, then another N over 4 parallel associations, into fedgate (``fedgate serve --dimse-port``, one
server process, embedded SQLite) and into Orthanc (Debian package, its DICOM server). C-FIND: ``findscu`` at
the study level (all studies, 6 keys) K times against each; the latency is the ``findscu`` process's wall
time (spawn included, the same for both) — p50 and p95.

Usage: .venv/bin/python bench/dimse_vs_orthanc.py [--n 2000] [--finds 50] [--write]   (--write appends the
table to bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicom_synth import ct_series  # noqa: E402
from tests.peers.orthanc import orthanc  # noqa: E402
from tests.procs import free_port  # noqa: E402


def generate(out: Path, n: int, tag: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files, per_study = [], 100
    for s in range(0, n, per_study):
        for ds in ct_series(patient_id=f"B{tag}{s // per_study}", patient_name=f"Bench^{tag}{s}", n=min(per_study, n - s),
                            size=512, accession=f"A{tag}{s}"):
            p = out / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
    return files


def store(port: int, aec: str, files: list[Path], associations: int) -> float:
    chunks = [files[i::associations] for i in range(associations)]

    def one(chunk):
        r = subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, chunk)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])

    t = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(one, chunks))
    return len(files) / (time.perf_counter() - t)


def finds(port: int, aec: str, k: int) -> list[float]:
    times = []
    for _ in range(k):
        t = time.perf_counter()
        r = subprocess.run(["findscu", "-S", "-aet", "BENCH", "-aec", aec, "-k", "QueryRetrieveLevel=STUDY",
                            "-k", "StudyInstanceUID", "-k", "PatientID", "-k", "PatientName", "-k", "StudyDate",
                            "-k", "AccessionNumber", "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(port)],
                           capture_output=True, text=True)
        times.append((time.perf_counter() - t) * 1000)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
    return times


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--finds", type=int, default=50)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dimsebench."))
    try:
        t = time.perf_counter()
        one, four = generate(work / "a", args.n, "a"), generate(work / "b", args.n, "b")
        print(f"generated {2 * args.n} instances in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        results: dict[str, dict] = {}
        # Orthanc
        oport = free_port()
        with orthanc(work / "orthanc", dicom_port=oport):
            results["orthanc"] = {"1": store(oport, "ORTHANC", one, 1), "4": store(oport, "ORTHANC", four, 4),
                                  "find": finds(oport, "ORTHANC", args.finds)}
        # fedgate
        fport, hport = free_port(), free_port()
        cfg = work / "fedgate.toml"
        cfg.write_text(f'dimse_port = {fport}\ndimse_accept_unknown = "pacs"\nlog_level = "WARNING"\n')
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--data-dir",
                                 str(work / "fedgate"), "--port", str(hport)], cwd=REPO, env=env)
        try:
            for _ in range(300):
                if subprocess.run(["echoscu", "-aec", "FEDGATE", "127.0.0.1", str(fport)],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            results["fedgate"] = {"1": store(fport, "FEDGATE", one, 1), "4": store(fport, "FEDGATE", four, 4),
                                  "find": finds(fport, "FEDGATE", args.finds)}
        finally:
            proc.terminate()
            proc.wait(30)
        o, f = results["orthanc"], results["fedgate"]
        orthanc_version = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        lines = [
            f"## DIMSE: fedgate vs Orthanc (issue 25) — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"Machine: {platform.node()}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"shared with other sessions; {orthanc_version}; fedgate: 1 server process, SQLite.",
            f"Command: `.venv/bin/python bench/dimse_vs_orthanc.py --n {args.n} --finds {args.finds}` — storescu of "
            f"{args.n} synthetic 512x512 CT instances (≈ 514 KB) over 1 association, then another {args.n} over 4; "
            f"findscu study level (all {2 * -(-args.n // 100)} studies, 6 keys) × {args.finds}, process wall time.",
            "",
            "| metric | Orthanc | fedgate | fedgate / Orthanc |",
            "|---|---:|---:|---:|",
            f"| C-STORE, 1 association (instances/s) | {o['1']:.1f} | {f['1']:.1f} | {f['1'] / o['1']:.2f} |",
            f"| C-STORE, 4 associations (instances/s) | {o['4']:.1f} | {f['4']:.1f} | {f['4'] / o['4']:.2f} |",
            f"| C-FIND study p50 (ms) | {p(o['find'], 50):.1f} | {p(f['find'], 50):.1f} | "
            f"{p(f['find'], 50) / p(o['find'], 50):.2f} |",
            f"| C-FIND study p95 (ms) | {p(o['find'], 95):.1f} | {p(f['find'], 95):.1f} | "
            f"{p(f['find'], 95) / p(o['find'], 95):.2f} |",
            "",
        ]
        print("\n".join(lines))
        if args.write:
            with open(REPO / "bench" / "RESULTS.md", "a") as fh:
                fh.write("\n" + "\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
