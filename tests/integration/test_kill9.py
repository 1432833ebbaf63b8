"""kill -9 under load (issue 20): STOW-RS and FHIR transactions from concurrent clients, a serving child of
``fedgate serve --processes 2`` killed at a seeded random moment, then the parent. Nothing acknowledged is
lost (every acknowledged instance byte-equal through WADO-RS, every acknowledged FHIR resource as written),
no file without its index row and no temp file — after a child's death without waiting for a parent
restart (the child started in its place settles what the dead one left), and after the parent's on the
next start."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys

import aiohttp

from tests.conftest import REPO
from tests.dicom_synth import ct_series, stow_body, to_bytes
from tests.integration.federation_fixtures import start_gateway_process
from tests.integration.test_dicomweb_bad_input import _blob_rows
from tests.integration.test_workers import _alive, _children
from tests.procs import wait_ready

BOUNDARY = "fedgateKILL9boundary"
STOW = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
SEED = int(os.environ.get("FEDGATE_KILL_SEED", "20"))


class Load:
    """Concurrent STOW and FHIR-transaction clients recording what the server acknowledged."""

    def __init__(self, gw, rng: random.Random) -> None:
        self.gw, self.rng = gw, rng
        self.sops: dict[str, tuple[str, str, bytes]] = {}
        self.fhir: dict[str, dict] = {}
        self.stop = asyncio.Event()
        self.n = 0

    async def stow(self, c: int) -> None:
        h = {**self.gw.headers("pacs"), "Content-Type": STOW}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            while not self.stop.is_set():
                self.n += 1
                ds = ct_series(patient_id=f"K{c}-{self.n}", patient_name=f"Kill^{c}", n=2, size=48)
                payload = [to_bytes(d) for d in ds]
                try:
                    async with http.post(self.gw.dicomweb + "/studies", data=stow_body(payload, BOUNDARY),
                                         headers=h) as r:
                        if r.status == 200:
                            for d, p in zip(ds, payload):
                                self.sops[d.SOPInstanceUID] = (d.StudyInstanceUID, d.SeriesInstanceUID, p)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)

    async def transactions(self, c: int) -> None:
        h = {**self.gw.headers("ehr-system"), "Content-Type": "application/fhir+json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            while not self.stop.is_set():
                self.n += 1
                pid, oid = f"k9p-{c}-{self.n}", f"k9o-{c}-{self.n}"
                patient = {"resourceType": "Patient", "id": pid, "name": [{"family": f"Kill{self.n}"}]}
                obs = {"resourceType": "Observation", "id": oid, "status": "final",
                       "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                       "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": self.n, "unit": "%"}}
                bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"resource": patient, "request": {"method": "PUT", "url": f"Patient/{pid}"}},
                    {"resource": obs, "request": {"method": "PUT", "url": f"Observation/{oid}"}}]}
                try:
                    async with http.post(self.gw.fhir, json=bundle, headers=h) as r:
                        if r.status == 200:
                            self.fhir[f"Patient/{pid}"] = patient
                            self.fhir[f"Observation/{oid}"] = obs
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)

    def start(self) -> list[asyncio.Task]:
        self.stop.clear()
        return [asyncio.create_task(self.stow(c)) for c in range(3)] + \
            [asyncio.create_task(self.transactions(c)) for c in range(2)]


async def _serving_pids(gw) -> set[int]:
    pids = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(30):
            try:
                async with http.get(gw.url + "/healthz") as r:
                    pids.add((await r.json())["pid"])
            except aiohttp.ClientError:
                pass
    return pids


def _disk_state(blobs) -> tuple[set[str], list]:
    files = {p.relative_to(blobs).as_posix() for p in blobs.rglob("*.dcm") if p.relative_to(blobs).parts[0] != "tmp"}
    temps = [p.name for p in (blobs / "tmp").glob("*.part")]
    return files, temps


async def _check_all_acknowledged(gw, load: Load) -> None:
    async with aiohttp.ClientSession() as http:
        h = {**gw.headers("clinician"), "Accept": "application/dicom; transfer-syntax=*"}
        for sop, (study, series, payload) in load.sops.items():
            async with http.get(f"{gw.dicomweb}/studies/{study}/series/{series}/instances/{sop}", headers=h) as r:
                assert r.status == 200, (sop, r.status)
                assert await r.read() == payload, f"instance {sop} not byte-equal"
        for ref, resource in load.fhir.items():
            async with http.get(f"{gw.fhir}/{ref}", headers=gw.headers("clinician")) as r:
                assert r.status == 200, (ref, r.status)
                got = await r.json()
            got.pop("meta", None)
            assert got == resource, ref


async def test_kill9_of_a_child_then_of_the_parent_loses_nothing_acknowledged(tmp_path, db_url):
    rng = random.Random(SEED)
    gw = await start_gateway_process(tmp_path, "k9", "", db_url=db_url, args=("--processes", "2"))
    blobs = gw.settings.data_dir / "blobs"
    load = Load(gw, rng)
    try:
        for _ in range(100):
            if len(await _serving_pids(gw)) == 2:
                break
            await asyncio.sleep(0.1)
        tasks = load.start()
        await asyncio.sleep(rng.uniform(1.5, 3.0))
        victim = rng.choice(sorted(await _serving_pids(gw)))
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        load.stop.set()
        await asyncio.gather(*tasks)
        for _ in range(150):  # the parent starts a process in its place
            pids = await _serving_pids(gw)
            if len(pids) == 2 and victim not in pids:
                break
            await asyncio.sleep(0.1)
        assert gw.proc.poll() is None
        # without a parent restart: no temp file of the dead child, no file without its row
        files, temps = _disk_state(blobs)
        assert not [t for t in temps if f"-{victim}-" in t], temps
        assert files == await _blob_rows(gw.settings.database_url), "files and index rows differ after a child's death"
        assert load.sops and load.fhir, "nothing was acknowledged before the kill"
        await _check_all_acknowledged(gw, load)

        # now the parent, in the middle of more writes: its children end with it
        tasks = load.start()
        await asyncio.sleep(rng.uniform(1.0, 2.5))
        children = _children(gw.proc.pid)
        os.kill(gw.proc.pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        load.stop.set()
        await asyncio.gather(*tasks)
        gw.proc.wait(10)
        for _ in range(100):
            if not any(_alive(c) for c in children):
                break
            await asyncio.sleep(0.1)
        env = dict(os.environ, FEDGATE_CONFIG=str(gw.settings.data_dir / "site.toml"))
        gw.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_ready(gw.url, gw.proc, timeout=60)
        files, temps = _disk_state(blobs)
        assert not temps, temps
        assert files == await _blob_rows(gw.settings.database_url), "files and index rows differ after restart"
        await _check_all_acknowledged(gw, load)
    finally:
        gw.stop()
