"""FHIR R4 JSON types (json.html §2.6.2): integer and decimal are JSON numbers, boolean is ``true``/``false``,
every other primitive a JSON string. The R4B models coerce (``"5"`` for a decimal, ``"true"`` for a boolean,
``"2"`` for an integer), so these used to be stored; now each is an OperationOutcome 400 naming the element,
on create, update, in a transaction and a batch entry, and as the result of a PATCH, and nothing is stored.
"""

from __future__ import annotations

import json

FHIR = {"Content-Type": "application/fhir+json"}
PATIENT = {"resourceType": "Patient", "gender": "female", "name": [{"family": "Typed"}]}
OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"},
       "subject": {"reference": "Patient/typed"}}

#: (case, resource, element path in the OperationOutcome)
MISTYPED = [
    ("decimal as a string", dict(OBS, valueQuantity={"value": "5", "unit": "/min"}), "Observation.valueQuantity.value"),
    ("integer as a string", dict(PATIENT, multipleBirthInteger="2"), "Patient.multipleBirthInteger"),
    ("boolean as a string", dict(PATIENT, active="true"), "Patient.active"),
    ("boolean as a number", dict(PATIENT, active=1), "Patient.active"),
    ("integer as a boolean", dict(PATIENT, multipleBirthInteger=True), "Patient.multipleBirthInteger"),
    ("integer with a fraction", dict(PATIENT, multipleBirthInteger=2.5), "Patient.multipleBirthInteger"),
    ("string as a number", dict(PATIENT, name=[{"family": 42}]), "Patient.name[0].family"),
    ("date as a number", dict(PATIENT, birthDate=19700101), "Patient.birthDate"),
    ("code as a boolean", dict(PATIENT, gender=True), "Patient.gender"),
    ("extension valueDecimal as a string",
     dict(PATIENT, extension=[{"url": "http://example.org/w", "valueDecimal": "1.5"}]),
     "Patient.extension[0].valueDecimal"),
    ("component value in a backbone element",
     dict(OBS, component=[{"code": {"text": "sys"}, "valueQuantity": {"value": "120"}}]),
     "Observation.component[0].valueQuantity.value"),
    ("contained resource", dict(OBS, contained=[{"resourceType": "Patient", "id": "c", "active": "false"}]),
     "Observation.contained[0].active"),
    ("referenceRange low", dict(OBS, referenceRange=[{"low": {"value": "60"}}]),
     "Observation.referenceRange[0].low.value"),
]


def _outcome_400(status: int, text: str, case: str, where: str) -> None:
    assert status == 400, f"{case}: {status} {text[:300]}"
    body = json.loads(text)
    assert body["resourceType"] == "OperationOutcome", f"{case}: {text[:300]}"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and "JSON" in issue["diagnostics"], (case, issue)
    assert where in issue.get("expression", []), (case, issue)


async def _count(http, gw, rtype: str) -> int:
    async with http.get(f"{gw.fhir}/{rtype}?_summary=count", headers=gw.headers("admin")) as r:
        assert r.status == 200
        return (await r.json())["total"]


async def test_mistyped_primitives_refused_everywhere(gateway, http):
    gw = gateway
    h = gw.headers("ehr-system") | FHIR
    for rtype, body in (("Patient", dict(PATIENT, id="typed")), ("Observation", dict(OBS, id="typed"))):
        async with http.put(f"{gw.fhir}/{rtype}/typed", data=json.dumps(body), headers=h) as r:
            assert r.status == 201, await r.text()
    before = {t: await _count(http, gw, t) for t in ("Patient", "Observation")}
    for case, body, where in MISTYPED:
        rtype = body["resourceType"]
        async with http.post(f"{gw.fhir}/{rtype}", data=json.dumps(body), headers=h) as r:
            _outcome_400(r.status, await r.text(), "create " + case, where)
        async with http.put(f"{gw.fhir}/{rtype}/typed", data=json.dumps(dict(body, id="typed")), headers=h) as r:
            _outcome_400(r.status, await r.text(), "update " + case, where)
        txn = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}},
            {"resource": body, "request": {"method": "POST", "url": rtype}}]}
        async with http.post(gw.fhir, data=json.dumps(txn), headers=h) as r:
            text = await r.text()
            assert r.status == 400, f"transaction {case}: {r.status} {text[:300]}"
            assert where in text, (case, text[:500])
        batch = dict(txn, type="batch")
        async with http.post(gw.fhir, data=json.dumps(batch), headers=h) as r:
            text = await r.text()
            assert r.status == 200, f"batch {case}: {r.status} {text[:300]}"
            entries = json.loads(text)["entry"]
        assert entries[0]["response"]["status"].startswith("201"), (case, entries[0])
        bad = entries[1]["response"]
        assert bad["status"].startswith("400"), (case, bad)
        assert where in bad["outcome"]["issue"][0].get("expression", []), (case, bad)
        async with http.delete(f"{gw.fhir}/Patient/{entries[0]['response']['location'].split('/')[1]}",
                               headers=h) as r:
            assert r.status in (200, 204)
        # PATCH whose result is mistyped
        path = where.split(".", 1)[1].replace("[", "/").replace("]", "").replace(".", "/")
        top = path.split("/")[0]
        ops = [{"op": "add", "path": "/" + top, "value": body[top]}]
        async with http.patch(f"{gw.fhir}/{rtype}/typed", data=json.dumps(ops),
                              headers=gw.headers("ehr-system") | {"Content-Type": "application/json-patch+json"}) as r:
            _outcome_400(r.status, await r.text(), "patch " + case, where)
    assert {t: await _count(http, gw, t) for t in ("Patient", "Observation")} == before
    for rtype in ("Patient", "Observation"):
        async with http.get(f"{gw.fhir}/{rtype}/typed/_history", headers=h) as r:
            assert (await r.json())["total"] == 1, rtype  # no update got through


async def test_well_typed_primitives_accepted(gateway, http):
    """Numbers (with and without a fraction, exponent), booleans and strings where R4 wants them stay legal."""
    h = gateway.headers("ehr-system") | FHIR
    ok = [
        dict(PATIENT, active=False, multipleBirthInteger=2, birthDate="1970-01-01"),
        dict(OBS, valueQuantity={"value": 5, "unit": "/min"}),
        dict(OBS, valueQuantity={"value": 72.50}, referenceRange=[{"low": {"value": 1e1}}]),
        dict(PATIENT, extension=[{"url": "http://example.org/w", "valueDecimal": -0.5},
                                 {"url": "http://example.org/b", "valueBoolean": True},
                                 {"url": "http://example.org/i", "valueInteger": 0}]),
    ]
    for body in ok:
        async with http.post(f"{gateway.fhir}/{body['resourceType']}", data=json.dumps(body), headers=h) as r:
            assert r.status == 201, await r.text()
