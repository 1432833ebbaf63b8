"""DIMSE: fedgate vs Orthanc's own DIMSE receive (issue 25), same files, one after the other in one run.

C-STORE throughput: DCMTK ``storescu`` of N synthetic 512x512 CT instances (16-bit, ≈ 514 KB each) over 1
association, then another N over 4 parallel associations, into fedgate (``fedgate serve --dimse-port``, its
default serving processes, embedded SQLite) and into Orthanc (Debian package, its DICOM server, the calling AE
title listed so that it answers C-FIND). C-FIND at the study level (all studies, 6 keys), ``findscu``:
* per association: K runs of ``findscu``, each timed from spawn to exit (process start, association, the
  find, release) — p50 and p95; the same binary against a port nobody listens on gives the start-up floor;
* per request: one ``findscu --repeat R`` association, each C-FIND timed by findscu's own log (request sent
  to final response received, DCMTK's logger with microsecond timestamps) — p50 and p95.
Each server's answer is checked first (all studies, no error), so a refused query cannot pass for a fast one.

Usage: .venv/bin/python bench/dimse_vs_orthanc.py [--n 2000] [--finds 50] [--repeat 200] [--write]
(--write appends the table to bench/RESULTS.md)
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
        if r.returncode != 0 or "E:" in r.stderr or "F:" in r.stderr:  # (a refused instance: storescu may exit 0)
            raise RuntimeError(r.stderr[-2000:])

    t = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(one, chunks))
    return len(files) / (time.perf_counter() - t)


FIND_KEYS = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID", "-k", "PatientName",
             "-k", "StudyDate", "-k", "AccessionNumber", "-k", "NumberOfStudyRelatedInstances"]
#: DCMTK logger configuration: only the lines that time a C-FIND, with microsecond timestamps
LOG_CFG = """log4cplus.rootLogger = INFO, A1
log4cplus.appender.A1 = log4cplus::ConsoleAppender
log4cplus.appender.A1.layout = log4cplus::PatternLayout
log4cplus.appender.A1.layout.ConversionPattern = %D{%H:%M:%S.%Q} %m%n
log4cplus.appender.A1.filters.1 = log4cplus::spi::StringMatchFilter
log4cplus.appender.A1.filters.1.StringToMatch = Sending Find Request
log4cplus.appender.A1.filters.1.AcceptOnMatch = true
log4cplus.appender.A1.filters.2 = log4cplus::spi::StringMatchFilter
log4cplus.appender.A1.filters.2.StringToMatch = Final Find Response
log4cplus.appender.A1.filters.2.AcceptOnMatch = true
log4cplus.appender.A1.filters.3 = log4cplus::spi::DenyAllFilter
"""


def check_find(port: int, aec: str, expect: int, work: Path) -> None:
    """The server answers the bench's C-FIND with ``expect`` matches and no error."""
    out = Path(tempfile.mkdtemp(dir=work))
    r = subprocess.run(["findscu", "-S", "-aet", "BENCH", "-aec", aec, "-X", "-od", str(out), *FIND_KEYS, "127.0.0.1",
                        str(port)], capture_output=True, text=True)
    got = len(list(out.glob("rsp*.dcm")))
    if r.returncode != 0 or got != expect or "E:" in r.stderr or "F:" in r.stderr:
        raise RuntimeError(f"{aec}: {got} matches of {expect}: {r.stderr[-2000:]}")


def finds(port: int, aec: str, k: int) -> list[float]:
    times = []
    for _ in range(k):
        t = time.perf_counter()
        r = subprocess.run(["findscu", "-S", "-aet", "BENCH", "-aec", aec, *FIND_KEYS, "127.0.0.1", str(port)],
                           capture_output=True, text=True)
        times.append((time.perf_counter() - t) * 1000)
        if aec != "NOBODY" and (r.returncode != 0 or "E:" in r.stderr or "F:" in r.stderr):
            raise RuntimeError(r.stderr[-2000:])
    return times


def finds_in_association(port: int, aec: str, repeat: int, work: Path) -> list[float]:
    """Milliseconds from each C-FIND request sent to its final response received, on one association."""
    cfg = work / "findscu-log.cfg"
    cfg.write_text(LOG_CFG)
    r = subprocess.run(["findscu", "-S", "-aet", "BENCH", "-aec", aec, "-lc", str(cfg), "--repeat", str(repeat),
                        *FIND_KEYS, "127.0.0.1", str(port)], capture_output=True, text=True)
    times, sent = [], None
    for line in (r.stdout + r.stderr).splitlines():
        stamp, _, what = line.partition(" ")
        try:
            h, m, rest = stamp.split(":")
            sec, ms, us = rest.split(".")
        except ValueError:
            continue
        t = int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1e3 + int(us) / 1e6
        if what.startswith("Sending Find Request"):
            sent = t
        elif "Final Find Response (Success)" in what and sent is not None:
            times.append((t - sent) * 1000)
            sent = None
    if r.returncode != 0 or len(times) != repeat:
        raise RuntimeError(f"{aec}: {len(times)} of {repeat} finds timed: {(r.stdout + r.stderr)[-2000:]}")
    return times


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--finds", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dimsebench."))
    try:
        t = time.perf_counter()
        one, four = generate(work / "a", args.n, "a"), generate(work / "b", args.n, "b")
        print(f"generated {2 * args.n} instances in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        results: dict[str, dict] = {}
        floor = finds(free_port(), "NOBODY", max(10, args.finds // 4))
        studies = 2 * -(-args.n // 100)

        def run(port: int, aec: str) -> dict:
            r: dict = {"load": [load()]}
            r["1"] = store(port, aec, one, 1)
            r["4"] = store(port, aec, four, 4)
            r["load"].append(load())
            check_find(port, aec, studies, work)
            r["find"] = finds(port, aec, args.finds)
            r["load"].append(load())
            r["req"] = finds_in_association(port, aec, args.repeat, work)
            r["load"].append(load())
            return r

        # Orthanc (the calling AE title listed: Orthanc refuses C-FIND from unknown AEs, and findscu exits 0)
        oport = free_port()
        with orthanc(work / "orthanc", dicom_port=oport, modalities={"bench": ["BENCH", "127.0.0.1", 104]}):
            results["orthanc"] = run(oport, "ORTHANC")
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
            results["fedgate"] = run(fport, "FEDGATE")
        finally:
            proc.terminate()
            proc.wait(30)
        o, f = results["orthanc"], results["fedgate"]
        orthanc_version = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        def row(name: str, key: str, q: int) -> str:
            a, b = p(o[key], q), p(f[key], q)
            return f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |"

        lines = [
            f"## DIMSE: fedgate vs Orthanc (issue 25) — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"Machine: {platform.node()}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"shared with other sessions; {orthanc_version}; fedgate: `fedgate serve` (default processes), SQLite.",
            f"Command: `.venv/bin/python bench/dimse_vs_orthanc.py --n {args.n} --finds {args.finds} --repeat "
            f"{args.repeat}` — storescu of {args.n} synthetic 512x512 CT instances (≈ 514 KB) over 1 association, "
            f"then another {args.n} over 4; findscu study level (all {studies} studies, 6 keys): {args.finds} "
            f"processes (spawn to exit), then {args.repeat} C-FINDs on one association (request to final response).",
            f"Load average (1/5/15 min) before stores / after stores / after finds / after repeat: Orthanc "
            f"{' → '.join(o['load'])}; fedgate {' → '.join(f['load'])}.",
            "",
            "| metric | Orthanc | fedgate | fedgate / Orthanc |",
            "|---|---:|---:|---:|",
            f"| C-STORE, 1 association (instances/s) | {o['1']:.1f} | {f['1']:.1f} | {f['1'] / o['1']:.2f} |",
            f"| C-STORE, 4 associations (instances/s) | {o['4']:.1f} | {f['4']:.1f} | {f['4'] / o['4']:.2f} |",
            row("C-FIND study, findscu process p50 (ms)", "find", 50),
            row("C-FIND study, findscu process p95 (ms)", "find", 95),
            row("C-FIND study, request on an open association p50 (ms)", "req", 50),
            row("C-FIND study, request on an open association p95 (ms)", "req", 95),
            "",
            f"findscu start-up floor (no server listening): p50 {p(floor, 50):.1f} ms, p95 {p(floor, 95):.1f} ms.",
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
