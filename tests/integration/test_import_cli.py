"""``fedgate import``: one result per file (stored / duplicate / skipped / failed with its reason), a
``--json`` listing, exit status 1 only for real failures — run as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.dicom_synth import ct_series, write

FEDGATE = str(Path(sys.executable).with_name("fedgate"))


def _import(folder: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDGATE, "import", str(folder), "--data-dir", str(data), "--quiet", *extra],
                          capture_output=True, text=True, timeout=180)


def test_import_reports_each_file(tmp_path):
    folder = tmp_path / "in"
    series = ct_series(patient_id="IMP", patient_name="Import^Me", n=4, size=32)
    paths = write(series, folder)
    (folder / "LICENSE").write_text("CC BY 4.0\n")
    (folder / "notes.txt").write_text("not DICOM")
    data = tmp_path / "data"

    first = _import(folder, data, "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(first.stdout)
    assert (report["files"], report["stored"], report["duplicate"], report["skipped"], report["failed"]) == (6, 4, 0, 2, 0)
    by_file = {Path(r["file"]).name: r for r in report["results"]}
    assert by_file["LICENSE"]["status"] == "skipped" and "not a DICOM file" in by_file["LICENSE"]["reason"]
    assert {by_file[p.name]["sop_uid"] for p in paths} == {ds.SOPInstanceUID for ds in series}

    # the same files again: duplicates, not "stored"; the text summary says so
    again = _import(folder, data)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 stored, 4 duplicate" in again.stdout and "2 skipped" in again.stdout
    assert "skipped  " in again.stdout and "LICENSE" in again.stdout

    # a changed instance under a stored SOP Instance UID, and a damaged Part 10 file: failed, named, exit 1
    bad = tmp_path / "bad"
    changed = series[0].copy()
    changed.SeriesDescription = "CHANGED"
    [changed_path] = write([changed], bad)
    truncated = bad / "truncated.dcm"
    truncated.write_bytes(paths[1].read_bytes()[:400])
    third = _import(bad, data, "--json")
    assert third.returncode == 1, third.stdout + third.stderr
    report = json.loads(third.stdout)
    assert (report["stored"], report["failed"]) == (0, 2)
    for r in report["results"]:
        assert r["status"] == "failed" and r["reason"], r
    assert {Path(r["file"]).name for r in report["results"]} == {changed_path.name, "truncated.dcm"}
    text = _import(bad, data)
    assert text.returncode == 1 and "truncated.dcm" in text.stdout and changed_path.name in text.stdout

    con = sqlite3.connect(data / "fedgate.db")
    try:
        assert con.execute("SELECT count(*) FROM dcm_instance").fetchone()[0] == 4
        assert con.execute("SELECT count(*) FROM fhir_resource WHERE res_type='ImagingStudy'").fetchone()[0] == 1
    finally:
        con.close()
