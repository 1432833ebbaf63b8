"""``fedgate serve --processes N`` (issue #3): several server processes share the port and every route
answers the same in each — the parent picks the process per connection (the one with the fewest open
connections), so the shared state is the store.  Real processes on both engines: concurrent STOW into one study from many clients (QIDO, the FHIR
ImagingStudy and the audit chain agree with what was sent), concurrent FHIR updates of one resource
(versions 1..n, no gap, no duplicate, no 409), consent withdrawal seen at once by every process, a
crashed child restarted, SIGTERM stopping all cleanly, SIGKILL of the parent leaving no child behind,
kept-alive connections spread evenly, the port not shared with a second server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import aiohttp
import pytest

from tests.conftest import REPO
from tests.dicom_synth import ct_series, stow_body
from tests.integration.federation_fixtures import ProcGateway, start_gateway_process
from tests.integration.test_consent_enforcement import FHIR_JSON, consent, patient
from tests.integration.test_workers import _alive, _children, sigkill_and_wait_children_gone

BOUNDARY = "fedgateMULTIPROCESSboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PROCESSES = 3


def _body(datasets) -> bytes:
    return stow_body(datasets, BOUNDARY)


def _fresh() -> aiohttp.ClientSession:
    """A session opening a new connection per request: the parent spreads them over the processes."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def _pids(gw: ProcGateway, n: int = 40) -> Counter:
    async with _fresh() as http:
        out = Counter()
        for _ in range(n):
            async with http.get(gw.url + "/healthz") as r:
                out[(await r.json())["pid"]] += 1
        return out


async def _start(tmp_path, db_url, toml: str = "") -> ProcGateway:
    gw = await start_gateway_process(tmp_path, "multi", toml, db_url=db_url, args=("--processes", str(PROCESSES)))
    # every child answers (a child still starting only delays the connections the kernel gives it)
    for _ in range(100):
        if len(_children(gw.proc.pid)) == PROCESSES and len(await _pids(gw, 20)) == PROCESSES:
            break
        await asyncio.sleep(0.1)
    return gw


def _audit_verify(gw: ProcGateway) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEDGATE_CONFIG=str(gw.settings.data_dir / "site.toml"))
    return subprocess.run([sys.executable, "-m", "gateway", "audit", "verify"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


async def test_stow_into_one_study_and_fhir_updates_from_many_clients(tmp_path, db_url):
    gw = await _start(tmp_path, db_url)
    try:
        served_by = await _pids(gw)
        assert len(served_by) >= 2, f"all requests were served by one process: {served_by}"
        assert set(served_by) <= _children(gw.proc.pid), "answered by a process that is not a child"

        # 8 clients, each sending its own series (12 instances, 3 requests of 4) into the SAME study
        study = None
        per_client = []
        for c in range(8):
            ds = ct_series(patient_id="MULTI1", patient_name="Multi^Process", n=12, size=32, study_uid=study,
                           series_description=f"client {c}")
            study = study or str(ds[0].StudyInstanceUID)
            per_client.append(ds)
        h = gw.headers("pacs") | {"Content-Type": DICOM_MP, "Accept": "application/dicom+json"}

        async def client(datasets) -> list[str]:
            stored = []
            async with _fresh() as http:
                for i in range(0, len(datasets), 4):
                    async with http.post(f"{gw.dicomweb}/studies/{study}", data=_body(datasets[i:i + 4]),
                                         headers=h) as r:
                        body = await r.json()
                        assert r.status == 200, body
                    stored += [x["00081155"]["Value"][0] for x in body["00081199"]["Value"]]
            return stored

        stored = [u for part in await asyncio.gather(*(client(d) for d in per_client)) for u in part]
        sent = {str(d.SOPInstanceUID) for ds in per_client for d in ds}
        assert sorted(stored) == sorted(sent)

        ch = gw.headers("clinician")
        async with _fresh() as http:
            async with http.get(f"{gw.dicomweb}/studies/{study}/instances", params={"limit": "1000"},
                                headers=ch) as r:
                found = {i["00080018"]["Value"][0] for i in await r.json()}
            assert found == sent
            async with http.get(f"{gw.dicomweb}/studies", params={"StudyInstanceUID": study,
                                "includefield": "00201208,00201206"}, headers=ch) as r:
                [hit] = await r.json()
            assert hit["00201208"]["Value"] == [96] and hit["00201206"]["Value"] == [8]
            async with http.get(f"{gw.dicomweb}/studies/{study}/series", headers=ch) as r:
                series = await r.json()
            assert sorted(s["00201209"]["Value"][0] for s in series) == [12] * 8
            async with http.get(f"{gw.fhir}/ImagingStudy/{study}", headers=ch) as r:
                res = await r.json()
            assert res["numberOfSeries"] == 8 and res["numberOfInstances"] == 96
            assert sorted(len(s["instance"]) for s in res["series"]) == [12] * 8
            assert {i["uid"] for s in res["series"] for i in s["instance"]} == sent
            assert {s["uid"] for s in res["series"]} == {str(ds[0].SeriesInstanceUID) for ds in per_client}

        # concurrent updates of one resource through every process: versions 1..n, each exactly once, no 409
        eh = gw.headers("ehr-system") | FHIR_JSON

        async def updater(c: int) -> list[int]:
            versions = []
            async with _fresh() as http:
                for i in range(5):
                    doc = patient("p-multi") | {"gender": ("female", "male")[(c + i) % 2]}
                    async with http.put(f"{gw.fhir}/Patient/p-multi", json=doc, headers=eh) as r:
                        assert r.status in (200, 201), await r.text()
                        versions.append(int((await r.json())["meta"]["versionId"]))
            return versions

        versions = sorted(v for vs in await asyncio.gather(*(updater(c) for c in range(8))) for v in vs)
        assert versions == list(range(1, 41))
        async with _fresh() as http:
            async with http.get(f"{gw.fhir}/Patient/p-multi/_history", params={"_count": "100"}, headers=eh) as r:
                hist = await r.json()
        assert sorted(int(e["resource"]["meta"]["versionId"]) for e in hist["entry"]) == list(range(1, 41))

        # conditional creates racing through every process (If-None-Exist, and a transaction Bundle's
        # ifNoneExist): one resource per identifier, created once; every other request finds it (200)
        async def creator(value: str, c: int) -> tuple[int, str]:
            doc = patient(value)
            del doc["id"]
            cond = f"identifier=urn:fedgate:test|{value}"
            async with _fresh() as http:
                if c % 2:
                    async with http.post(f"{gw.fhir}/Patient", json=doc,
                                         headers=eh | {"If-None-Exist": cond}) as r:
                        assert r.status in (200, 201), await r.text()
                        return r.status, (await r.json())["id"]
                bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
                    "resource": doc, "request": {"method": "POST", "url": "Patient", "ifNoneExist": cond}}]}
                async with http.post(gw.fhir, json=bundle, headers=eh) as r:
                    assert r.status == 200, await r.text()
                    [entry] = (await r.json())["entry"]
                    return int(entry["response"]["status"].split()[0]), entry["response"]["location"].split("/")[1]

        for value in ("p-cond-1", "p-cond-2", "p-cond-3"):
            answers = await asyncio.gather(*(creator(value, c) for c in range(8)))
            assert sorted(s for s, _ in answers) == [200] * 7 + [201], answers
            assert len({i for _, i in answers}) == 1, answers
            async with _fresh() as http:
                async with http.get(f"{gw.fhir}/Patient", params={"identifier": f"urn:fedgate:test|{value}"},
                                    headers=eh) as r:
                    assert (await r.json())["total"] == 1
    finally:
        children = _children(gw.proc.pid)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(30) == 0
        gw.stop()
    assert not any(_alive(p) for p in children)
    # every process flushed its audit batch at the stop, and the chain they wrote together is intact
    out = _audit_verify(gw)
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split("ok: ")[1].split()[0]) >= 24 + 40  # ≥ one event per STOW and per update


async def test_consent_withdrawal_is_seen_by_every_process(tmp_path, db_url):
    gw = await _start(tmp_path, db_url)
    try:
        eh = gw.headers("ehr-system") | FHIR_JSON
        gru = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        async with _fresh() as http:
            for pid in ("p-gru", "p-other"):
                async with http.put(f"{gw.fhir}/Patient/{pid}", json=patient(pid), headers=eh) as r:
                    assert r.status == 201, await r.text()
            async with http.put(f"{gw.fhir}/Consent/c-p-gru", json=consent("p-gru", ["DUO:0000042"], [], {}),
                                headers=eh) as r:
                assert r.status == 201, await r.text()

            async def visible() -> set[str]:
                async with http.get(f"{gw.fhir}/Patient", headers=gru) as r:
                    assert r.status == 200
                    return {e["resource"]["id"] for e in (await r.json()).get("entry", [])}

            # a new permission may take up to consent.refresh_s (1 s) to reach a process: wait until all see it
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if all([await visible() == {"p-gru"} for _ in range(3 * PROCESSES)]):
                    break
                await asyncio.sleep(0.2)
            assert await visible() == {"p-gru"}

            withdrawn = consent("p-gru", ["DUO:0000042"], [], {"status": "inactive"})
            async with http.put(f"{gw.fhir}/Consent/c-p-gru", json=withdrawn, headers=eh) as r:
                assert r.status == 200, await r.text()
            # withdrawal: the very next requests, whichever process answers, show nothing
            seen = [await visible() for _ in range(10 * PROCESSES)]
            assert all(s == set() for s in seen), seen
        assert len(await _pids(gw)) >= 2
    finally:
        gw.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_crashed_child_is_restarted_and_children_die_with_the_parent(tmp_path, db_url):
    gw = await _start(tmp_path, db_url)
    try:
        first = _children(gw.proc.pid)
        assert len(first) == PROCESSES
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _children(gw.proc.pid)
            if len(now) == PROCESSES and victim not in now and len(await _pids(gw, 30)) == PROCESSES:
                break
            await asyncio.sleep(0.2)
        now = _children(gw.proc.pid)
        assert victim not in now and len(now) == PROCESSES, "the parent did not restart the killed process"
        assert set(await _pids(gw, 30)) == now
        assert await sigkill_and_wait_children_gone(gw.proc, now), "server processes survived the SIGKILL of their parent"
    finally:
        gw.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_kept_alive_connections_are_spread_evenly_and_the_port_is_not_shared(tmp_path, db_url):
    """Clients that keep their connections open (a PACS, a viewer, the benchmark) get them spread over the
    processes: the parent hands each new connection to the process with the fewest open ones. (With one
    SO_REUSEPORT socket per process the kernel hashed them: 4 connections all in one of 2 processes one
    time in 8.)"""
    gw = await _start(tmp_path, db_url)
    try:
        await asyncio.sleep(0.5)  # the readiness probes' closed connections reported by their processes
        for _ in range(2):  # twice: the first round's connections, once closed, no longer count
            sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(2 * PROCESSES)]
            try:
                async def pid_of(http: aiohttp.ClientSession) -> int:
                    async with http.get(gw.url + "/healthz") as r:
                        return (await r.json())["pid"]

                first = await asyncio.gather(*(pid_of(h) for h in sessions))
                assert sorted(Counter(first).values()) == [2] * PROCESSES, Counter(first)
                assert set(first) == _children(gw.proc.pid)
                # the connections stay where they are: each session's next requests reach the same process
                again = await asyncio.gather(*(pid_of(h) for h in sessions))
                assert again == first
            finally:
                for h in sessions:
                    await h.close()
            await asyncio.sleep(0.5)
        # a second server on the same port fails at once instead of sharing it
        env = dict(os.environ, FEDGATE_CONFIG=str(gw.settings.data_dir / "site.toml"))
        second = subprocess.run([sys.executable, "-m", "gateway", "serve", "--processes", "2"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "cannot bind" in second.stderr, second.stderr[-2000:]
    finally:
        gw.stop()
