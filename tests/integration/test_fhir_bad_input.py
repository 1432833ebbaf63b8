"""Issue 2: bad input gets a FHIR OperationOutcome with the right 4xx, and nothing is stored partially.

Each row of TABLE is one request: (case, method, path, headers, body, expected status, expected issue code).
After every row the test checks the store still holds exactly what the seeding put there.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import make_settings, start_gateway

LIMIT = 64 * 1024
FHIR = {"Content-Type": "application/fhir+json"}


def _txn(*entries: dict) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}).encode()


def _post(resource: dict, full_url: str | None = None) -> dict:
    entry = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


GOOD_PATIENT = {"resourceType": "Patient", "gender": "female", "name": [{"family": "Good"}]}
PID = "urn:uuid:" + str(uuid.uuid4())

TABLE = [
    ("malformed json", "POST", "/Patient", FHIR, b'{"resourceType": "Patient",', 400, "invalid"),
    ("empty body", "POST", "/Patient", FHIR, b"", 400, "invalid"),
    ("json array body", "POST", "/Patient", FHIR, b"[1, 2]", 400, "invalid"),
    ("wrong resourceType for endpoint", "POST", "/Patient", FHIR,
     json.dumps({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}).encode(), 400, None),
    ("unknown resourceType", "POST", "/Patient", FHIR, json.dumps({"resourceType": "Pationt"}).encode(), 400, None),
    ("invalid field type (gender number)", "POST", "/Patient", FHIR,
     json.dumps({"resourceType": "Patient", "gender": 123}).encode(), 400, None),  # R4 JSON: a string
    ("invalid date", "POST", "/Patient", FHIR,
     json.dumps({"resourceType": "Patient", "birthDate": "31/12/1999"}).encode(), 422, None),
    ("unknown element", "POST", "/Patient", FHIR,
     json.dumps({"resourceType": "Patient", "colour": "blue"}).encode(), 422, None),
    ("missing required element", "POST", "/Observation", FHIR,
     json.dumps({"resourceType": "Observation", "status": "final"}).encode(), 422, None),
    ("id mismatch on update", "PUT", "/Patient/abc", FHIR,
     json.dumps({"resourceType": "Patient", "id": "xyz"}).encode(), 400, None),
    ("wrong media type", "POST", "/Patient", {"Content-Type": "text/plain"},
     json.dumps(GOOD_PATIENT).encode(), 415, None),
    ("xml not spoken", "GET", "/Patient", {"Accept": "application/fhir+xml"}, None, 406, None),
    ("huge body", "POST", "/Patient", FHIR,
     json.dumps(dict(GOOD_PATIENT, text={"status": "generated", "div": "x" * (2 * LIMIT)})).encode(), 413, None),
    ("unknown search parameter", "GET", "/Patient?colour=blue", {}, None, 400, None),
    ("bad date search value", "GET", "/Observation?date=yesterday", {}, None, 400, None),
    ("bad _count", "GET", "/Patient?_count=many", {}, None, 400, None),
    ("bad quantity prefix", "GET", "/Observation?value-quantity=zz5", {}, None, 400, None),
    ("_include of a non-reference", "GET", "/Observation?_include=Observation:code", {}, None, 400, None),
    ("unknown resource read", "GET", "/Patient/does-not-exist", {}, None, 404, "not-found"),
    ("bad version read", "GET", "/Patient/seeded/_history/99", {}, None, 404, "not-found"),
    ("stale If-Match", "PUT", "/Patient/seeded", {**FHIR, "If-Match": 'W/"7"'},
     json.dumps(dict(GOOD_PATIENT, id="seeded")).encode(), 412, None),
    ("ambiguous conditional create", "POST", "/Patient", {**FHIR, "If-None-Exist": "gender=female"},
     json.dumps(GOOD_PATIENT).encode(), 412, None),
    ("transaction with one invalid entry", "POST", "", FHIR,
     _txn(_post(GOOD_PATIENT, PID),
          _post({"resourceType": "Observation", "status": "final", "code": {"text": "ok"},
                 "subject": {"reference": PID}}),
          _post({"resourceType": "Observation", "status": "final", "code": {"text": "bad"},
                 "valueQuantity": {"value": "not-a-number"}})), 400, None),  # R4 JSON: a number
    ("transaction with unresolvable conditional reference", "POST", "", FHIR,
     _txn(_post({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                 "subject": {"reference": "Patient?identifier=urn:none|missing"}})), 412, "not-found"),
    ("transaction with duplicate fullUrl", "POST", "", FHIR,
     _txn(_post(GOOD_PATIENT, PID), _post(GOOD_PATIENT, PID)), 400, None),
    ("bundle of type document to the transaction endpoint", "POST", "", FHIR,
     json.dumps({"resourceType": "Bundle", "type": "document", "entry": []}).encode(), 400, None),
    ("transaction entry without request", "POST", "", FHIR,
     json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": GOOD_PATIENT}]}).encode(),
     400, None),
]


@pytest.fixture
async def small_gateway(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, max_body_bytes=LIMIT))
    try:
        yield gw
    finally:
        await gw.server.close()


async def _snapshot(http, gw) -> dict[str, int]:
    h = gw.headers("admin")
    out = {}
    for rtype in ("Patient", "Observation"):
        async with http.get(f"{gw.fhir}/{rtype}?_summary=count", headers=h) as r:
            assert r.status == 200
            out[rtype] = (await r.json())["total"]
    async with http.get(f"{gw.fhir}/Patient/seeded/_history", headers=h) as r:
        out["seeded versions"] = (await r.json())["total"]
    return out


async def test_bad_input_table(small_gateway, http):
    gw = small_gateway
    h = gw.headers("ehr-system")
    async with http.put(f"{gw.fhir}/Patient/seeded", data=json.dumps(dict(GOOD_PATIENT, id="seeded")),
                        headers=h | FHIR) as r:
        assert r.status == 201
    async with http.post(f"{gw.fhir}/Patient", data=json.dumps(GOOD_PATIENT), headers=h | FHIR) as r:
        assert r.status == 201
    before = await _snapshot(http, gw)
    failures = []
    for case, method, path, headers, body, status, code in TABLE:
        async with http.request(method, gw.fhir + path, data=body, headers=h | headers) as r:
            text = await r.text()
            got_ok = r.status == status
            try:
                outcome = json.loads(text)
            except ValueError:
                outcome = {}
            if not got_ok or outcome.get("resourceType") != "OperationOutcome":
                failures.append(f"{case}: {r.status} {text[:200]}")
                continue
            issue = outcome["issue"][0]
            if issue["severity"] not in ("error", "fatal") or not issue.get("diagnostics"):
                failures.append(f"{case}: issue without severity/diagnostics: {issue}")
            if code and issue["code"] != code:
                failures.append(f"{case}: issue code {issue['code']} != {code}")
            assert "Bearer" not in text and "eyJ" not in text  # no token echoed back
        after = await _snapshot(http, gw)
        if after != before:
            failures.append(f"{case}: store changed {before} -> {after}")
            before = after
    assert not failures, "\n".join(failures)


async def test_deleted_resource_is_gone(gateway, http):
    h = gateway.headers("ehr-system") | FHIR
    async with http.post(f"{gateway.fhir}/Patient", data=json.dumps(GOOD_PATIENT), headers=h) as r:
        pid = (await r.json())["id"]
    async with http.delete(f"{gateway.fhir}/Patient/{pid}", headers=h) as r:
        assert r.status in (200, 204)
    async with http.get(f"{gateway.fhir}/Patient/{pid}", headers=h) as r:
        assert r.status == 410
        assert (await r.json())["resourceType"] == "OperationOutcome"
    async with http.get(f"{gateway.fhir}/Patient/{pid}/_history/1", headers=h) as r:
        assert r.status == 200  # the old version stays readable
    async with http.get(f"{gateway.fhir}/Patient?_id={pid}", headers=h) as r:
        assert (await r.json())["total"] == 0
