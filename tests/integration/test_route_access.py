"""Every route is declared public, self-authenticating, gated or free of patient data (``gateway/routes.py``),
and a router walk with a *recording* consent gate proves that every gated route asks the gate (issue #19).

The walk makes one request per route (method + a concrete URL for its path, a plausible body) with a valid
research token, against a store holding a consented patient with a DICOM study, and counts the gate's
``scope_for`` calls that request caused.  A gated route whose handler forgot the gate — a query built
without a scope — fails here, whatever its answer."""

from __future__ import annotations

import re

import aiohttp
from aiohttp.test_utils import TestServer

from gateway import keys
from gateway.app import create_app
from gateway.routes import GATED, NO_PATIENT_DATA, PUBLIC, ROUTE_ACCESS, SELF_AUTH
from gateway.services.consent import ConsentGate
from tests.conftest import Gateway, make_settings
from tests.dicom_synth import ct_series, stow_body

PURPOSE = {"codes": ["DUO:0000042"]}
BOUNDARY = "fedgateROUTEWALK"


class RecordingGate(ConsentGate):
    """The real consent gate, counting its decisions."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.calls = 0

    async def scope_for(self, requester):
        self.calls += 1
        return await super().scope_for(requester)


def _consent(pid: str) -> dict:
    return {"resourceType": "Consent", "id": f"c-{pid}", "status": "active", "patient": {"reference": f"Patient/{pid}"},
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "policyRule": {"coding": [{"system": "http://purl.obolibrary.org/obo/duo", "code": "DUO:0000042"}]},
            "provision": {"type": "permit"}}


def _url(formatter: str, values: dict) -> str:
    return formatter.format(**{n: values[n] for n in re.findall(r"{(\w+)}", formatter)})


async def test_every_route_is_declared_and_every_gated_route_calls_the_gate(tmp_path, db_url):
    settings = make_settings(tmp_path / "data", db_url, extra={"consent": {"refresh_s": 0}})
    app = create_app(settings)
    gate = RecordingGate(settings)
    app[keys.GATE] = gate
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gw = Gateway(server, settings)
    try:
        routes = [r for r in app.router.routes() if r.method not in ("HEAD", "OPTIONS")]
        names = {r.name for r in routes}
        undeclared = sorted(n for n in names if n not in ROUTE_ACCESS)
        assert not undeclared, f"routes without an access declaration in gateway/routes.py: {undeclared}"
        assert not sorted(set(ROUTE_ACCESS) - names), "declared routes that do not exist"
        assert set(ROUTE_ACCESS.values()) <= {PUBLIC, SELF_AUTH, GATED, NO_PATIENT_DATA}
        assert app[keys.PUBLIC_ROUTES] == {n for n, k in ROUTE_ACCESS.items() if k in (PUBLIC, SELF_AUTH)}

        async with aiohttp.ClientSession() as http:
            ehr = gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in ({"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:t", "value": "p1"}]},
                          _consent("p1"))]}
            async with http.post(gw.fhir, json=bundle, headers=ehr) as r:
                assert r.status == 200, await r.text()
            (ds,) = ct_series(patient_id="p1", patient_name="Walk^P1", n=1, size=16)
            async with http.post(f"{gw.dicomweb}/studies", data=stow_body([ds], BOUNDARY), headers=gw.headers("pacs") | {
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}) as r:
                assert r.status == 200, await r.text()
            values = {"type": "Patient", "id": "p1", "vid": "1", "study": ds.StudyInstanceUID,
                      "series": ds.SeriesInstanceUID, "instance": ds.SOPInstanceUID, "frames": "1", "tag": "7FE00010",
                      "job": "1", "run": "r1", "name": "m", "version": "1", "file": "Patient.ndjson"}
            bodies = {
                "fhir.bundle": {"resourceType": "Bundle", "type": "batch",
                                "entry": [{"request": {"method": "GET", "url": "Patient/p1"}}]},
                "fhir.create": {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "p2"}]},
                "fhir.update": {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:t", "value": "p1"}]},
                "omop.export": {"format": "csv", "name": "walk"},
                "fhir.patch": [{"op": "replace", "path": "/active", "value": True}],
                "inference.submit_job": {"model": "none", "study": ds.StudyInstanceUID},
                "export.dicom_start": {"studies": [ds.StudyInstanceUID], "target": {"folder": "walk"}},
            }
            bodies["fhir.bundle_slash"] = bodies["fhir.bundle"]
            research = gw.headers("admin", purpose=PURPOSE)
            missed, errors = [], []
            checked = 0
            for route in routes:
                kind = ROUTE_ACCESS[route.name]
                if kind != GATED:
                    continue
                info = route.resource.get_info()
                url = gw.url + (info.get("path") or _url(info["formatter"], values))
                if route.name.startswith("fhir.search_system"):
                    url += "?_type=Patient"
                headers = dict(research)
                body = bodies.get(route.name)
                if route.name.startswith("fhir."):
                    headers["Content-Type"] = "application/fhir+json"
                    if route.name == "fhir.search_post":
                        headers["Content-Type"] = "application/x-www-form-urlencoded"
                    if route.name == "fhir.patch":
                        headers["Content-Type"] = "application/json-patch+json"
                before = gate.calls
                kw = {}
                if body is not None:
                    import json

                    kw = {"data": json.dumps(body)}
                    headers.setdefault("Content-Type", "application/json")
                async with http.request(route.method, url, headers=headers, **kw) as r:
                    await r.read()
                    status = r.status
                assert status != 401, (route.name, url)
                if status >= 500:
                    errors.append((route.name, route.method, status))
                if gate.calls == before:
                    missed.append((route.name, route.method, status))
                checked += 1
            assert checked >= 35
            assert not missed, f"gated routes that never asked the consent gate: {missed}"
            assert not errors, f"server errors: {errors}"
    finally:
        await server.close()
