"""What an operator sees of a running ``fedgate serve``: a start line (version, where the settings came from,
engine), a serving line with the address, a stopping line (requests still in flight, drained) and a stopped
line — and settings read from ``FEDGATE_<NAME>_FILE`` secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from gateway.settings import SettingsError, load_settings
from tests.conftest import REPO
from tests.procs import free_port, wait_ready


async def test_start_and_stop_log_lines(tmp_path):
    port = free_port()
    secret = tmp_path / "metrics-token"
    secret.write_text("scraper-token-" + "t" * 30 + "\n")
    env = dict(os.environ, FEDGATE_METRICS_TOKEN_FILE=str(secret), FEDGATE_LOG_LEVEL="INFO")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--data-dir", str(tmp_path / "d"),
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc, timeout=60)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics",
                                headers={"Authorization": "Bearer scraper-token-" + "t" * 30}) as r:
                assert r.status == 200  # the token came from the _FILE setting
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    by_msg = {}
    for line in lines:
        by_msg.setdefault(line["msg"], line)
    start = by_msg["starting"]
    assert start["version"] and start["engine"] == "sqlite"
    assert "env " in start["settings_source"] and "FEDGATE_METRICS_TOKEN_FILE" in start["settings_source"]
    assert "flags --data-dir,--port" in start["settings_source"]
    assert by_msg["serving"]["url"] == f"http://127.0.0.1:{port}"
    assert by_msg["stopping"]["in_flight"] == 0
    assert by_msg["stopped"]["exit_code"] == 0
    order = [line["msg"] for line in lines if line["msg"] in ("starting", "serving", "stopping", "stopped")]
    assert order == ["starting", "serving", "stopping", "stopped"]
    assert "scraper-token" not in err


def test_settings_file_variables(tmp_path):
    f = tmp_path / "pw"
    f.write_text("postgresql://u:secret@db:5432/fedgate\n")
    s = load_settings(env={"FEDGATE_DATABASE_URL_FILE": str(f)})
    assert s.database_url == "postgresql://u:secret@db:5432/fedgate"
    # the plain variable wins over the file (more specific), flags over both
    s = load_settings(env={"FEDGATE_DATABASE_URL_FILE": str(f), "FEDGATE_DATABASE_URL": "sqlite:///x.db"})
    assert s.database_url == "sqlite:///x.db"
    with pytest.raises(SettingsError, match="FEDGATE_JWT_SECRET_FILE"):
        load_settings(env={"FEDGATE_JWT_SECRET_FILE": str(tmp_path / "missing")})
