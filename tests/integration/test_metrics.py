"""/metrics through the running server: Prometheus text format parsed with prometheus-client's own parser,
its protection modes, values that move with real traffic, no patient data in any label, and one answer for
all processes of ``fedgate serve --processes 2``."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_settings, start_gateway
from tests.dicom_synth import ct_series, stow_body

BOUNDARY = "fedgateMETRICSboundary"
STOW_CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FHIR_JSON = "application/fhir+json"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def _scrape(http: aiohttp.ClientSession, url: str, headers: dict) -> dict:
    async with http.get(url + "/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return _samples(await r.text())


async def test_metrics_follow_real_traffic_and_carry_no_patient_data(gateway, http):
    admin = gateway.headers("admin")
    before = await _scrape(http, gateway.url, admin)
    assert _value(before, "fedgate_build_info", version="0.1.0") == 1

    name = "Zyxwvut^Metricpatient"
    body = stow_body(ct_series(patient_id="MRN-METRICS-77", patient_name=name, n=3, size=16), BOUNDARY)
    async with http.post(gateway.dicomweb + "/studies", data=body,
                         headers={**gateway.headers("pacs"), "Content-Type": STOW_CT}) as r:
        assert r.status == 200
    async with http.post(gateway.dicomweb + "/studies", data=body,  # the same again: duplicates
                         headers={**gateway.headers("pacs"), "Content-Type": STOW_CT}) as r:
        assert r.status in (200, 202)
    async with http.get(gateway.fhir + "/Patient", params={"name": "Zyxwvut"}, headers=gateway.headers("clinician")):
        pass
    async with http.get(gateway.fhir + "/Patient/does-not-exist", headers=gateway.headers("clinician")) as r:
        assert r.status == 404
    async with http.get(gateway.fhir + "/Patient", headers=gateway.headers("analyst", purpose="DUO:0000042")) as r:
        assert r.status == 200
    async with http.get(gateway.fhir + "/Patient", headers=gateway.headers("analyst")) as r:  # no purpose: refused
        assert r.status == 403

    async with http.get(gateway.url + "/metrics", headers=admin) as r:
        text = await r.text()
    after = _samples(text)
    assert _value(after, "fedgate_stow_instances_total", outcome="stored") \
        - _value(before, "fedgate_stow_instances_total", outcome="stored") == 3
    assert _value(after, "fedgate_stow_instances_total", outcome="duplicate") == 3
    assert _value(after, "fedgate_stow_bytes_total") >= len(body) * 0.9
    assert _value(after, "fedgate_http_requests_total", route="/fhir/{type}/{id}", method="GET", status="404") == 1
    assert _value(after, "fedgate_http_requests_total", route="/dicomweb/studies", method="POST") == 2
    assert _value(after, "fedgate_http_request_duration_seconds_count", route="/dicomweb/studies") == 2
    assert _value(after, "fedgate_consent_decisions_total", outcome="restricted") >= 1
    assert _value(after, "fedgate_consent_decisions_total", outcome="refused") >= 1
    assert _value(after, "fedgate_consent_decisions_total", outcome="unrestricted") >= 1
    assert ("fedgate_audit_backlog", ()) in after
    for needle in ("Zyxwvut", "Metricpatient", "MRN-METRICS-77", "does-not-exist", "DUO:0000042"):
        assert needle not in text


async def test_metrics_protection_modes(tmp_path, db_url):
    async with aiohttp.ClientSession() as http:
        gw = await start_gateway(make_settings(tmp_path / "p", db_url, metrics_token="scrape-" + "s" * 30))
        try:
            async with http.get(gw.url + "/metrics") as r:
                assert r.status == 401 and r.headers["Content-Type"].startswith("application/problem+json")
            async with http.get(gw.url + "/metrics", headers=gw.headers("clinician")) as r:
                assert r.status == 403
            async with http.get(gw.url + "/metrics", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            await _scrape(http, gw.url, {"Authorization": "Bearer scrape-" + "s" * 30})
            await _scrape(http, gw.url, gw.headers("site"))
        finally:
            await gw.server.close()
        gw = await start_gateway(make_settings(tmp_path / "o", db_url, metrics="open"))
        try:
            await _scrape(http, gw.url, {})
        finally:
            await gw.server.close()
        gw = await start_gateway(make_settings(tmp_path / "f", db_url, metrics="off"))
        try:
            async with http.get(gw.url + "/metrics", headers=gw.headers("admin")) as r:
                assert r.status == 404
        finally:
            await gw.server.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_metrics_add_up_every_serving_process(tmp_path, db_url):
    from tests.integration.federation_fixtures import start_gateway_process

    gw = await start_gateway_process(tmp_path, "mp", 'metrics = "open"', db_url=db_url, args=("--processes", "2"))
    try:
        pids = set()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(40):
                async with http.get(gw.url + "/healthz") as r:
                    pids.add((await r.json())["pid"])
            assert len(pids) == 2
            await asyncio.sleep(0.2)
            samples = await _scrape(http, gw.url, {})
        assert _value(samples, "fedgate_http_requests_total", route="/healthz", status="200") == 40
    finally:
        gw.proc.terminate()
        gw.proc.wait(30)
