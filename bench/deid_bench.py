"""DICOM de-identification throughput (issue #24): fedgate's PS3.15 Basic Profile vs Orthanc's /anonymize.

Generates ``--n`` 512×512 16-bit CT instances (a real CT header from pydicom's test data: CT_small.dcm,
plus planted private tags; fresh UIDs and random pixels per instance), then

* fedgate: ``gateway.services.deid.deidentify_file`` (read, de-identify, write Part 10 bytes) in this
  process, one instance after another — instances per CPU-second of this process;
* Orthanc (Debian package, started here on a free loopback port): the same files uploaded, then
  ``POST /instances/{id}/anonymize`` (the PS3.15 Basic Profile of Orthanc's version; the answer is the
  anonymized file) one after another from one client — instances per wall second and per CPU-second of
  the Orthanc process (from /proc).

Prints a Markdown section for bench/RESULTS.md.  Usage: ``python bench/deid_bench.py --n 200``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.services.deid import deidentify_file  # noqa: E402
from mappings.deid.dicom import Withheld  # noqa: E402
from mappings.deid.keys import ProjectKeys  # noqa: E402


def make_files(folder: Path, n: int) -> list[Path]:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(24)
    study = generate_uid()
    series = generate_uid()
    out = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = rng.integers(-1024, 2000, size=(512, 512), dtype=np.int16).tobytes()
        ds.PatientName = "Bench^Patient"
        ds.PatientID = "BENCH-0001"
        block = ds.private_block(0x0029, "BENCH PRIVATE", create=True)
        block.add_new(0x01, "LO", "private text")
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def bench_fedgate(files: list[Path]) -> dict:
    keys = ProjectKeys("bench", b"b" * 32)
    deidentify_file(files[0], keys, "p-1")  # warm-up (imports, table)
    cpu0, t0 = time.process_time(), time.perf_counter()
    total = 0
    for f in files:
        out = deidentify_file(f, keys, "p-1")
        assert not isinstance(out, Withheld)
        total += len(out)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"n": len(files), "wall_s": wall, "cpu_s": cpu, "bytes": total}


#: bench_fedgate's loop, run by a child process against another checkout (its own imports only)
_TREE_LOOP = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from gateway.services.deid import deidentify_file
from mappings.deid.keys import ProjectKeys
files = [Path(p) for p in Path(sys.argv[2]).read_text().split()]
keys = ProjectKeys("bench", b"b" * 32)
deidentify_file(files[0], keys, "p-1")
cpu0, t0 = time.process_time(), time.perf_counter()
total = sum(len(deidentify_file(f, keys, "p-1")) for f in files)
cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
print(json.dumps({"n": len(files), "wall_s": wall, "cpu_s": cpu, "bytes": total}))
"""


def bench_tree(tree: Path, files: list[Path]) -> dict:
    """:func:`bench_fedgate` in a child process that imports fedgate from another checkout ``tree`` (e.g. a
    ``git worktree`` of an older commit): the same files, one after the other with this tree's run."""
    listing = Path(files[0]).parent / "files.txt"
    listing.write_text("\n".join(str(f) for f in files))
    tree = tree.resolve()
    out = subprocess.run([sys.executable, "-c", _TREE_LOOP, str(tree), str(listing)], env=dict(os.environ, PYTHONPATH=str(tree)),
                         capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_orthanc(files: list[Path], workdir: Path) -> dict | None:
    binary = shutil.which("Orthanc")
    if binary is None:
        return None
    port = _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "deid-bench", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
        "StorageCompression": False, "HttpPort": port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomServerEnabled": False, "SaveJobs": False}))
    log = open(workdir / "orthanc.log", "w")
    proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if requests.get(url + "/system", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        http = requests.Session()
        ids = [http.post(url + "/instances", data=f.read_bytes(), timeout=60).json()["ID"] for f in files]
        http.post(f"{url}/instances/{ids[0]}/anonymize", json={}, timeout=60).raise_for_status()  # warm-up
        version = http.get(url + "/system", timeout=5).json().get("Version")
        cpu0, t0 = _cpu_s(proc.pid), time.perf_counter()
        for i in ids:
            r = http.post(f"{url}/instances/{i}/anonymize", json={}, timeout=60)
            r.raise_for_status()
        wall, cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
        return {"n": len(ids), "wall_s": wall, "cpu_s": cpu, "version": version}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="instances (512×512 CT)")
    ap.add_argument("--baseline", type=Path, help="another fedgate checkout (e.g. a git worktree of the commit "
                    "before a change) timed on the same files in the same run")
    ap.add_argument("--no-orthanc", action="store_true", help="leave Orthanc out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deid-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        files = make_files(tmp / "in", args.n)
        base = bench_tree(args.baseline, files) if args.baseline else None
        ours = bench_fedgate(files)
        orth = None if args.no_orthanc else bench_orthanc(files, tmp / "orthanc")
    size = files and 512 * 512 * 2
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"## DICOM de-identification (issue #24) — {when}\n")
    print(f"Machine: {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, Python "
          f"{platform.python_version()}), shared with other sessions' work.")
    print(f"Command: `.venv/bin/python bench/deid_bench.py {' '.join(sys.argv[1:])}` ({args.n} CT instances, 512×512×16 bit, "
          f"{size // 1024} KiB pixel data each)\n")
    print("| de-identifier | instances | wall s | CPU s | instances/s (wall) | instances per CPU-second |")
    print("|---|---|---|---|---|---|")
    print(f"| fedgate `deidentify_file` (read + PS3.15 Basic Profile + options + write), in process | {ours['n']} | "
          f"{ours['wall_s']:.2f} | {ours['cpu_s']:.2f} | {ours['n'] / ours['wall_s']:.0f} | {ours['n'] / ours['cpu_s']:.0f} |")
    if base:
        print(f"| the same, baseline checkout `{args.baseline}` | {base['n']} | {base['wall_s']:.2f} | "
              f"{base['cpu_s']:.2f} | {base['n'] / base['wall_s']:.0f} | {base['n'] / base['cpu_s']:.0f} |")
    if orth:
        print(f"| Orthanc {orth['version']} `POST /instances/{{id}}/anonymize`, 1 client (Orthanc CPU only) | "
              f"{orth['n']} | {orth['wall_s']:.2f} | {orth['cpu_s']:.2f} | {orth['n'] / orth['wall_s']:.0f} | "
              f"{orth['n'] / max(orth['cpu_s'], 1e-9):.0f} |")
    elif not args.no_orthanc:
        print("| Orthanc | not installed (scripts/setup.d/20-orthanc.sh) | | | | |")
    if base:
        print(f"\nSame run, CPU per instance: baseline / this tree = {base['cpu_s'] / ours['cpu_s']:.2f}×"
              f" (output bytes {base['bytes']} vs {ours['bytes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
