"""MLServer (KServe v2, from .venv-mlserver) started by tests on free loopback ports, serving fedgate's
TorchScript models through inference/mlserver_runtime.py.  A missing .venv-mlserver is a test error
(installed by scripts/setup.d/30-mlserver.sh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"


class MLServer:
    def __init__(self, workdir: Path, repo: Path, models: list[str], record: Path | None = None) -> None:
        if not MLSERVER.exists():
            raise RuntimeError(f"{MLSERVER} missing: run scripts/setup.d/30-mlserver.sh")
        self.dir = workdir
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.record = record
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": self.http_port, "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port, "parallel_workers": 0, "debug": False,
        }))
        for m in models:
            d = workdir / m
            d.mkdir(exist_ok=True)
            extra = {"output": "OUTPUT__0"}
            if record is not None:
                extra["record"] = str(record)
            (d / "model-settings.json").write_text(json.dumps({
                "name": m, "implementation": "inference.mlserver_runtime.TorchScriptRuntime",
                "parameters": {"uri": str(repo / m / "1" / "model.pt"), "version": "1", "extra": extra},
            }))
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "mlserver.log"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 120.0) -> "MLServer":
        env = dict(os.environ, PYTHONPATH=str(ROOT), MLSERVER_METRICS_PORT=str(self.metrics_port))
        self.proc = subprocess.Popen([str(MLSERVER), "start", str(self.dir)], cwd=self.dir, env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MLServer exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"MLServer not ready after {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
