"""Helpers for tests that run real server processes on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
#: The CLI of the code under test: the interpreter running the tests, on this checkout's ``gateway``
#: package (run with ``cwd=REPO``), whichever virtual environment that is.
FEDGATE = [sys.executable, "-m", "gateway"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll ``url``/readyz until it answers 200; fail if ``proc`` exits or ``timeout`` passes (a bound for a
    loaded machine, not a start-up time requirement: bench/RESULTS.md has those)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout} s")
