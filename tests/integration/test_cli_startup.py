"""The quick CLI commands start without the heavy stacks (issue 27: ``fedgate --help``, ``token``,
``consent evaluate`` and ``model list`` in < 1 s).

Each runs in a subprocess under ``python -X importtime``; the test reads the modules it imported and
fails on any heavy package the command does not need — not on a timing (bench/RESULTS.md has the
measured start times).  ``consent evaluate`` needs rdflib (it loads duo.owl); ``model list`` needs
SQLAlchemy (it reads the store); nothing else here needs the app, the DICOM stack, the FHIR models,
numpy, torch or Triton's client.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = {"torch", "tritonclient", "pydicom", "highdicom", "fhir", "numpy", "PIL", "rdflib", "sqlalchemy",
         "aiohttp", "pydantic", "tqdm", "matplotlib"}

COMMANDS = [
    ("--help", ["--help"], None, set()),
    ("token", ["token", "--role", "clinician", "--data-dir", "{data}"], None, set()),
    ("consent evaluate", ["consent", "evaluate"],
     json.dumps({"consent": {"permission": "DUO:0000042"}, "purpose": {"codes": ["DUO:0000042"]}}), {"rdflib"}),
    ("model list", ["model", "list", "--data-dir", "{data}"], None, {"sqlalchemy"}),
]


def imported(stderr: str) -> set[str]:
    """Top-level packages named in ``-X importtime`` output."""
    out = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                out.add(name.split(".")[0])
    return out


@pytest.mark.parametrize("label,args,stdin,needs", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_quick_commands_import_no_heavy_stack(tmp_path, label, args, stdin, needs):
    argv = [a.replace("{data}", str(tmp_path / "data")) for a in args]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gateway", *argv], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), label  # it did its work
    mods = imported(proc.stderr)
    assert "gateway" in mods  # (the importtime output was read)
    assert not (mods & (HEAVY - needs)), (label, sorted(mods & (HEAVY - needs)))
