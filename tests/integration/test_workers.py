"""The gateway's spawn worker processes end with it, even when the gateway is SIGKILLed (no shutdown code
runs): otherwise every crash of a site would leave orphaned parse/validation workers behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp

from tests.integration.federation_fixtures import start_gateway_process


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def sigkill_and_wait_children_gone(proc, children: set[int], timeout: float = 15.0) -> bool:
    """SIGKILL ``proc`` (no shutdown code runs) and wait up to ``timeout`` s for ``children`` to end; True when
    none is left."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        await asyncio.sleep(0.1)
    return not any(_alive(p) for p in children)


async def test_workers_exit_when_the_gateway_is_killed(tmp_path):
    gw = await start_gateway_process(tmp_path, "crash", "validation_workers = 2\n")
    try:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "id": f"w{i}", "gender": "female"},
             "request": {"method": "PUT", "url": f"Patient/w{i}"}} for i in range(200)]}
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.fhir, json=bundle, headers=gw.headers("ehr-system")
                                 | {"Content-Type": "application/fhir+json"}) as r:
                assert r.status == 200, await r.text()
        workers = set()
        for _ in range(50):
            workers = _children(gw.proc.pid)
            if workers:
                break
            await asyncio.sleep(0.1)
        assert workers, "the gateway started no worker process (validation_workers = 2)"
        assert await sigkill_and_wait_children_gone(gw.proc, workers), "orphaned worker processes survived the gateway"
    finally:
        gw.stop()
