"""The README's quick start as a newcomer runs it, in a plain shell (no venv activated): ``./scripts/run``
serves the demo data with its research consents, every command of the README's example blocks runs as
written and answers as its comment says (the clinician sees every patient, the analyst with a research
purpose a consent-filtered, non-empty subset), and the commands ``fedgate demo`` prints run as printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.procs import free_port

README = REPO / "README.md"


def _plain_env(**extra: str) -> dict:
    """A shell without a venv on PATH, as on a fresh terminal: neither the checkout's nor the one running
    the tests (which may be any other)."""
    venvs = {str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)}
    if os.environ.get("VIRTUAL_ENV"):
        venvs.add(str(Path(os.environ["VIRTUAL_ENV"]) / "bin"))
    path = ":".join(p for p in os.environ.get("PATH", "").split(":") if p and ".venv" not in p and p not in venvs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "FEDGATE_"))}
    env.update(PATH=path, **extra)
    return env


def _quickstart_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("## What is where")]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"./scripts/run exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("qs") / "data"
    port = free_port()
    proc = subprocess.Popen(["./scripts/run"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_plain_env(FEDGATE_DATA_DIR=str(data), FEDGATE_PORT=str(port),
                                           FEDGATE_DIMSE_PORT=str(free_port())),
                            start_new_session=True, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, proc, timeout=600)
        yield url, data
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _readme_line(line: str, url: str, data: Path) -> str:
    line = line.replace(" /tmp/", f" {data.parent}/")  # (README's scratch outputs)
    return line.replace("http://127.0.0.1:8080", url).replace("./data", str(data))


def test_readme_examples_run_as_written_and_show_the_consent_gate(served):
    url, data = served
    blocks = _quickstart_blocks()
    assert blocks[0].strip().startswith("./scripts/run") and "./scripts/test" in blocks[0]
    examples = [b for b in blocks[1:] if "curl" in b or "./fedgate" in b]
    assert examples, "the quick start shows no example"
    script = "set -euo pipefail\n"
    expected = []
    for block in examples:
        for line in block.strip().splitlines():
            line = _readme_line(line, url, data)
            if line.startswith("curl "):
                m = re.search(r"#\s*total (\d+)", line)
                cmd = line.split("  #")[0].replace("curl ", "curl -sS -f ", 1)
                n = len(expected)
                script += f'echo "@@{n}@@$({cmd})"\n'
                expected.append(int(m.group(1)) if m else None)
            elif line.startswith(("export ", "./fedgate")):
                script += line.split("  #")[0] + "\n"
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=_plain_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    answers = dict(re.findall(r"@@(\d+)@@(.*)", out.stdout))
    totals = []
    for n, want in enumerate(expected):
        body = answers[str(n)]
        if want is not None:
            m = re.search(r"\"total\"\s*:\s*(\d+)", body)
            assert m, f"README example {n}: no total in {body[:300]!r}; stderr {out.stderr[-1500:]}"
            got = int(m.group(1))
            assert got == want, f"README example {n}: total {got}, README says {want}"
            totals.append(got)
    clinician, analyst = totals[:2]
    assert 0 < analyst < clinician


def test_demo_prints_commands_that_run_as_printed(tmp_path):
    base = free_port()
    while any(_busy(base + i) for i in range(4)):
        base = free_port()
    fedgate = str(REPO / "fedgate")
    proc = subprocess.Popen([fedgate, "demo", "--dir", str(tmp_path / "fed"), "--base-port", str(base),
                             "--patients", "60", "--seconds", "240"], cwd=tmp_path, env=_plain_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        commands = []
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "Ctrl-C" in line:
                break
            if " query " in line:
                commands.append(line.strip())
        assert len(commands) == 2, commands
        for cmd in commands:
            assert cmd.startswith("/"), f"not runnable from any directory: {cmd}"
            out = subprocess.run(["bash", "-c", cmd], cwd="/", env=_plain_env(), capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
            assert "TOTAL" in out.stdout or '"count"' in out.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
