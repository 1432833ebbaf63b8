"""Where a ``findscu`` C-FIND's time goes in fedgate's DIMSE listener: per-phase timestamps of each association.

The server runs with tracing hooks added from outside the product code (pynetdicom notification events, and
wrappers around the listener's C-FIND handler and its hop into the event loop); ``findscu`` (DCMTK) runs K
times at the study level, each timed from spawn to exit. Every timestamp is ``time.time()`` (one clock for the
client driver and the server process), so each phase is read on the same scale.

Usage: .venv/bin/python bench/dimse_find_profile.py [--studies 40] [--finds 100] [--orthanc]
(--orthanc: also time the same findscu against Orthanc holding the same files, and a findscu that finds no
server, the floor of process start-up; figures go to bench/RESULTS.md by hand.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIND = ["-S", "-aet", "BENCH", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID",
        "-k", "PatientName", "-k", "StudyDate", "-k", "AccessionNumber", "-k", "NumberOfStudyRelatedInstances"]


# ----------------------------------------------------------------------------------------- traced server
def serve_traced(trace_path: str, argv: list[str]) -> int:
    """``fedgate serve`` with timestamps of each association's phases appended to ``trace_path``."""
    from pynetdicom import evt

    from gateway import cli
    from gateway.handlers import dimse

    lock = threading.Lock()
    out = open(trace_path, "a", buffering=1)

    def mark(assoc, what: str) -> None:
        with lock:
            out.write(json.dumps([time.time(), id(assoc) if assoc is not None else 0, what]) + "\n")

    def pdu(kind):
        def h(event):
            mark(event.assoc, f"{kind} {type(event.pdu).__name__}")
        return h

    notify = [(evt.EVT_CONN_OPEN, lambda e: mark(e.assoc, "conn open")),
              (evt.EVT_ACCEPTED, lambda e: mark(e.assoc, "accepted")),
              (evt.EVT_PDU_RECV, pdu("recv")), (evt.EVT_PDU_SENT, pdu("sent")),
              (evt.EVT_DIMSE_RECV, lambda e: mark(e.assoc, "dimse recv")),
              (evt.EVT_RELEASED, lambda e: mark(e.assoc, "released")),
              (evt.EVT_CONN_CLOSE, lambda e: mark(e.assoc, "conn close"))]

    start = dimse.DimseListener.start

    def traced_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        for event, handler in notify:
            self.server.bind(event, handler)
        on_requested = self.on_requested

        def requested(event):
            mark(event.assoc, "requested")
            return on_requested(event)
        self.server.unbind(evt.EVT_REQUESTED, on_requested)
        self.server.bind(evt.EVT_REQUESTED, requested)

    on_find = dimse.DimseListener.on_find

    def traced_find(self, event):
        assoc = event.assoc
        mark(assoc, "find start")
        n = 0
        for item in on_find(self, event):
            n += 1
            if n == 1:
                mark(assoc, "first match")
            yield item
        mark(assoc, f"find end ({n})")

    call_raw = dimse.DimseListener._call_raw
    current = threading.local()

    def traced_call_raw(self, coro):
        assoc = getattr(current, "assoc", None)

        async def wrapped():
            mark(assoc, "loop: coroutine starts")
            try:
                return await coro
            finally:
                mark(assoc, "loop: coroutine ends")
        mark(assoc, "hop to loop")
        try:
            return call_raw(self, wrapped())
        finally:
            mark(assoc, "back from loop")

    def with_assoc(fn):
        def inner(self, event):
            current.assoc = event.assoc
            return fn(self, event)
        return inner

    on_store = dimse.DimseListener.on_store

    def traced_store(self, event):
        mark(event.assoc, "store start")
        try:
            return on_store(self, event)
        finally:
            mark(event.assoc, "store end")

    store_co = dimse.DimseListener._store

    async def traced_store_co(self, requester, part, *args):
        mark(getattr(current, "assoc", None), "file written")
        return await store_co(self, requester, part, *args)

    dimse.DimseListener.on_store = with_assoc(traced_store)
    dimse.DimseListener._store = traced_store_co
    if os.environ.get("DIMSE_PROFILE_SWITCH_S"):  # (experiment: the interpreter's GIL switch interval)
        sys.setswitchinterval(float(os.environ["DIMSE_PROFILE_SWITCH_S"]))
    dimse.DimseListener.start = traced_start
    dimse.DimseListener.on_find = with_assoc(traced_find)
    dimse.DimseListener._call_raw = traced_call_raw
    return cli.main(argv)


# ----------------------------------------------------------------------------------------- driver
def wait_echo(port: int, aec: str) -> None:
    for _ in range(300):
        if subprocess.run(["echoscu", "-aec", aec, "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("no C-ECHO answer")


def findscu(port: int, aec: str, k: int, env=None) -> list[tuple[float, float]]:
    spans = []
    for _ in range(k):
        t0 = time.time()
        r = subprocess.run(["findscu", *FIND, "-aec", aec, "127.0.0.1", str(port)], capture_output=True, env=env)
        spans.append((t0, time.time()))
        if r.returncode != 0 and aec != "NOBODY":  # (NOBODY: no server, the floor)
            raise RuntimeError(r.stderr[-2000:])
    return spans


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def phases(trace: Path, spans: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Per find: milliseconds between consecutive marks (first occurrence of each), spawn to exit at the ends."""
    by_assoc: dict[int, list] = defaultdict(list)
    for line in trace.read_text().splitlines():
        t, a, what = json.loads(line)
        by_assoc[a].append((t, what))
    assocs = sorted((sorted(v) for k, v in by_assoc.items() if k), key=lambda v: v[0][0])
    out: dict[str, list[float]] = defaultdict(list)
    for t0, t1 in spans:
        # the association this findscu process opened: the one whose first mark falls within its lifetime
        marks = sorted(next((m for m in assocs if t0 <= m[0][0] <= t1), []))
        if not marks:
            continue
        prev, label = t0, "spawn"
        seen = set()
        for t, what in marks:
            key = f"{label} -> {what}"
            if key in seen:
                key += " (again)"
            seen.add(key)
            out[key].append((t - prev) * 1000)
            prev, label = t, what
        out[f"{label} -> client exit"].append((t1 - prev) * 1000)
        out["TOTAL spawn -> exit"].append((t1 - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--finds", type=int, default=100)
    ap.add_argument("--orthanc", action="store_true")
    args = ap.parse_args()

    from tests.dicom_synth import ct_series
    from tests.procs import free_port

    work = Path(tempfile.mkdtemp(prefix="dimseprof."))
    try:
        files = []
        for s in range(args.studies):
            for ds in ct_series(patient_id=f"P{s}", patient_name=f"Prof^{s}", n=2, size=16, accession=f"A{s}"):
                p = work / "in" / f"{ds.SOPInstanceUID}.dcm"
                p.parent.mkdir(exist_ok=True)
                ds.save_as(p, enforce_file_format=True)
                files.append(str(p))
        fport, hport = free_port(), free_port()
        cfg = work / "fedgate.toml"
        cfg.write_text(f'dimse_port = {fport}\ndimse_accept_unknown = "pacs"\nlog_level = "WARNING"\n')
        trace = work / "trace.jsonl"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, __file__, "--serve-traced", str(trace), "serve", "--config", str(cfg),
                                 "--data-dir", str(work / "fedgate"), "--port", str(hport), "--processes", "1"],
                                cwd=REPO, env=env)
        try:
            wait_echo(fport, "FEDGATE")
            subprocess.run(["storescu", "-aet", "BENCH", "-aec", "FEDGATE", "127.0.0.1", str(fport), *files],
                           check=True, capture_output=True)
            findscu(fport, "FEDGATE", 5)  # warm-up
            spans = findscu(fport, "FEDGATE", args.finds)
        finally:
            proc.terminate()
            proc.wait(30)
        load = os.getloadavg()
        if os.environ.get("KEEP_TRACE"):
            shutil.copy(trace, os.environ["KEEP_TRACE"])
        rows = phases(trace, spans)
        print(f"fedgate: {args.finds} findscu, {args.studies} study matches, load average {load[0]:.2f}")
        print(f"{'phase':<62} {'p50':>7} {'p95':>7}  (ms)")
        for key, v in sorted(rows.items(), key=lambda kv: -len(kv[1])):
            if len(v) >= len(spans) // 2:
                print(f"{key:<62} {pct(v, 50):7.2f} {pct(v, 95):7.2f}")
        if args.orthanc:
            from tests.peers.orthanc import orthanc
            oport = free_port()
            with orthanc(work / "orthanc", dicom_port=oport):
                subprocess.run(["storescu", "-aet", "BENCH", "-aec", "ORTHANC", "127.0.0.1", str(oport), *files],
                               check=True, capture_output=True)
                findscu(oport, "ORTHANC", 5)
                o = [(b - a) * 1000 for a, b in findscu(oport, "ORTHANC", args.finds)]
            floor = [(b - a) * 1000 for a, b in findscu(free_port(), "NOBODY", 20)]
            print(f"orthanc findscu spawn -> exit: p50 {pct(o, 50):.2f} p95 {pct(o, 95):.2f} ms")
            print(f"findscu with no server (start-up floor): p50 {pct(floor, 50):.2f} p95 {pct(floor, 95):.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-traced":
        raise SystemExit(serve_traced(sys.argv[2], sys.argv[3:]))
    raise SystemExit(main())
