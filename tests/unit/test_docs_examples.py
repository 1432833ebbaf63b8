"""Documented examples are real output: the ``fedgate consent evaluate`` example of docs/consent.md is run
as written and must print exactly what the page shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_consent_evaluate_example_matches_real_output():
    text = (REPO / "docs" / "consent.md").read_text()
    block = re.search(r"## 1\. `fedgate consent evaluate`.*?```sh\n(.*?)```", text, flags=re.S).group(1)
    lines = block.rstrip("\n").split("\n")
    documented = lines[-1]
    command = "\n".join(lines[:-1])
    assert command.rstrip().endswith("./fedgate consent evaluate")
    command = command.replace("./fedgate", f"{sys.executable} -m gateway")
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + command], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == documented
