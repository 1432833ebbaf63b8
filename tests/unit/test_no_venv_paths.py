"""The suite runs from any virtual environment with fedgate installed, not only the checkout's ``.venv``:
tests start the CLI as ``sys.executable -m gateway`` (or beside ``sys.executable``), never through a path
into ``.venv``.  (MLServer's own environment, ``.venv-mlserver``, is a separate install by design.)
Run from another environment: ``python -m venv /tmp/v && /tmp/v/bin/pip install -e '.[test,ml]' &&
/tmp/v/bin/python -m pytest tests/...`` (README)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: ``.venv/...`` or ``".venv"`` as a path, not ``.venv-mlserver``
VENV_PATH = re.compile(r"""\.venv(?![-\w])\s*["'/]|["']\.venv["']""")


def test_no_test_reaches_into_the_checkouts_venv():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0].replace('".venv" not in', "")  # (a venv taken *off* PATH)
            if VENV_PATH.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "tests that only run from .venv:\n" + "\n".join(offenders)


def test_the_scanner_finds_a_venv_path():
    assert VENV_PATH.search('FEDGATE = REPO / ".venv" / "bin" / "fedgate"')
    assert VENV_PATH.search('subprocess.run([".venv/bin/fedgate", "load"])')
    assert not VENV_PATH.search('MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"')
