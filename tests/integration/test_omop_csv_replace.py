"""``fedgate omop export --csv DIR --replace``: an earlier export is replaced (re-running the README's
command works); a folder holding anything else is never emptied."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.procs import FEDGATE, REPO


def _export(tmp_path: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDGATE, "omop", "export", "--data-dir", str(tmp_path / "data"), "--purpose",
                           "DUO:0000042", "--csv", str(target), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_replace_only_an_earlier_export(tmp_path):
    out = tmp_path / "omop"
    assert _export(tmp_path, out).returncode == 0
    assert (out / "person.csv").exists() and (out / "coverage.json").exists()
    again = _export(tmp_path, out)
    assert again.returncode != 0 and "use replace" in again.stderr
    replaced = _export(tmp_path, out, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "person.csv").exists()

    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.txt").write_text("keep me")
    refused = _export(tmp_path, other, "--replace")
    assert refused.returncode != 0 and "not replaced" in refused.stderr
    assert (other / "thesis.txt").read_text() == "keep me"
