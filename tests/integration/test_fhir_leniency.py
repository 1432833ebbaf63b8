"""Issue 20: what FHIR (and DICOMweb) used to accept leniently, and the NUL that only PostgreSQL refused.

* FHIR R4 JSON rules: ``""``, ``null``, ``{}``, ``[]``, control characters (NUL ...) and over-long primitives
  are refused with an OperationOutcome 400, alone and inside a transaction, and nothing is stored;
* a 10,000-character id (read, update, delete, history) gets an OperationOutcome 400, not aiohttp's text;
* ``_history?_count=-1`` is a 400;
* NUL in a FHIR search parameter, a QIDO search parameter and in DICOM PN/LO/PatientID values: the same
  answer on SQLite and PostgreSQL (refused: 400, or a STOW failure reason for that part alone).
"""

from __future__ import annotations

import json

import pytest

from tests.dicom_synth import ct_series, referenced_sops, stow_body

FHIR = {"Content-Type": "application/fhir+json"}
OK = {"resourceType": "Patient", "gender": "female", "name": [{"family": "Lenient", "given": ["A"]}]}

BAD_RESOURCES = [
    ("empty string", dict(OK, gender=""), "Patient.gender"),
    ("empty string in array", dict(OK, name=[{"family": "X", "given": [""]}]), "Patient.name[0].given[0]"),
    ("null", dict(OK, gender=None), "Patient.gender"),
    ("null in array without _twin", dict(OK, name=[{"family": "X", "given": ["A", None]}]),
     "Patient.name[0].given[1]"),
    ("empty object", dict(OK, name=[{}]), "Patient.name[0]"),
    ("empty nested object", dict(OK, maritalStatus={}), "Patient.maritalStatus"),
    ("empty array", dict(OK, name=[]), "Patient.name"),
    ("NUL in a string", dict(OK, name=[{"family": "a\x00b"}]), "Patient.name[0].family"),
    ("U+0001 in a string", dict(OK, name=[{"family": "a\x01b"}]), "Patient.name[0].family"),
    ("NUL in an extension value", dict(OK, extension=[{"url": "http://x.org/e", "valueString": "\x00"}]),
     "Patient.extension[0].valueString"),
    ("10 MB language", dict(OK, language="x" * 10_000_000), "Patient.language"),
    ("2 MiB string", dict(OK, name=[{"text": "y" * (2 * 1024 * 1024)}]), "Patient.name[0].text"),
    ("NUL in a contained resource", dict(OK, contained=[{"resourceType": "Organization", "id": "o",
                                                        "name": "\x00"}]), "Patient.contained[0].name"),
]


async def _count(http, gw, rtype="Patient") -> int:
    async with http.get(f"{gw.fhir}/{rtype}?_summary=count", headers=gw.headers("admin")) as r:
        assert r.status == 200
        return (await r.json())["total"]


def _outcome_400(status: int, text: str, case: str) -> dict:
    assert status == 400, f"{case}: {status} {text[:300]}"
    body = json.loads(text)
    assert body["resourceType"] == "OperationOutcome", f"{case}: {text[:300]}"
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["diagnostics"]
    return body


async def test_fhir_json_rules_refused_alone_and_in_transactions(gateway, http):
    gw = gateway
    h = gw.headers("ehr-system") | FHIR
    async with http.put(f"{gw.fhir}/Patient/keep", data=json.dumps(dict(OK, id="keep")), headers=h) as r:
        assert r.status == 201
    before = await _count(http, gw)
    for case, body, where in BAD_RESOURCES:
        raw = json.dumps(body)
        async with http.post(f"{gw.fhir}/Patient", data=raw, headers=h) as r:
            out = _outcome_400(r.status, await r.text(), case)
        assert where in out["issue"][0].get("expression", []), (case, out)
        async with http.put(f"{gw.fhir}/Patient/keep", data=json.dumps(dict(body, id="keep")), headers=h) as r:
            _outcome_400(r.status, await r.text(), "PUT " + case)
        txn = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": OK, "request": {"method": "POST", "url": "Patient"}},
            {"resource": body, "request": {"method": "POST", "url": "Patient"}}]}
        async with http.post(gw.fhir, data=json.dumps(txn), headers=h) as r:
            _outcome_400(r.status, await r.text(), "transaction " + case)
        assert await _count(http, gw) == before, case  # nothing stored, not even the good entry
    async with http.get(f"{gw.fhir}/Patient/keep/_history", headers=h) as r:
        assert (await r.json())["total"] == 1


async def test_fhir_json_rules_keep_what_r4_allows(gateway, http):
    """Nulls aligned with a _element array, whitespace-only text, tab/CR/LF and a 64-character id stay legal."""
    h = gateway.headers("ehr-system") | FHIR
    ok = dict(OK, name=[{"family": "Twin", "given": ["A", None], "_given": [None, {"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}],
        "text": "line one\r\n\tline two"}], language="en-GB")
    async with http.post(f"{gateway.fhir}/Patient", data=json.dumps(ok), headers=h) as r:
        assert r.status == 201, await r.text()
    async with http.put(f"{gateway.fhir}/Patient/{'a' * 64}", data=json.dumps(dict(OK, id="a" * 64)),
                        headers=h) as r:
        assert r.status == 201, await r.text()


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("DELETE", ""), ("PUT", ""), ("GET", "/_history"),
                                           ("GET", "/_history/1")])
async def test_overlong_id_is_an_operation_outcome(gateway, http, method, suffix):
    h = gateway.headers("ehr-system") | FHIR
    rid = "a" * 10_000
    body = json.dumps(dict(OK, id=rid)) if method == "PUT" else None
    async with http.request(method, f"{gateway.fhir}/Patient/{rid}{suffix}", data=body, headers=h) as r:
        text = await r.text()
        assert r.content_type == "application/fhir+json", text[:200]
        out = _outcome_400(r.status, text, f"{method} {suffix}")
        assert "not a FHIR id" in out["issue"][0]["diagnostics"]
        assert rid not in text  # not echoed whole


@pytest.mark.parametrize("path", ["/_history", "/Patient/_history", "/Patient/keep/_history"])
async def test_history_negative_count_is_400(gateway, http, path):
    h = gateway.headers("ehr-system") | FHIR
    async with http.put(f"{gateway.fhir}/Patient/keep", data=json.dumps(dict(OK, id="keep")), headers=h) as r:
        assert r.status == 201
    async with http.get(f"{gateway.fhir}{path}?_count=-1", headers=h) as r:
        _outcome_400(r.status, await r.text(), path)


@pytest.mark.parametrize("query", ["name=a%00b", "family=%00", "identifier=urn:x|a%00", "_id=a%00",
                                   "name%00=x", "gender=female&name=%01"])
async def test_nul_in_fhir_search_is_400_on_both_engines(gateway, http, query):
    h = gateway.headers("ehr-system")
    async with http.get(f"{gateway.fhir}/Patient?{query}", headers=h) as r:
        _outcome_400(r.status, await r.text(), query)
    # the same criteria as a conditional create's If-None-Exist
    async with http.post(f"{gateway.fhir}/Patient", data=json.dumps(OK),
                         headers=h | FHIR | {"If-None-Exist": query}) as r:  # decoded like a query
        assert r.status == 400, await r.text()


BOUNDARY = "nul-boundary"
STOW = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


@pytest.mark.parametrize("field,kw", [
    ("PatientName", {"patient_name": "A\x00B"}),
    ("PatientID", {"patient_id": "P\x001"}),
    ("SeriesDescription", {"series_description": "x\x00y"}),
    ("StudyDescription", {"patient_name": "Ok^Name", "_study_description": "ab\x01c"}),
])
async def test_nul_in_dicom_values_refused_alone_on_both_engines(gateway, http, field, kw):
    h = gateway.headers("pacs") | STOW
    kw = dict(kw)
    study_desc = kw.pop("_study_description", None)
    bad = ct_series(patient_id=kw.pop("patient_id", "NUL-1"), patient_name=kw.pop("patient_name", "Nul^Test"),
                    n=1, **kw)[0]
    if study_desc:
        bad.StudyDescription = study_desc
    good = ct_series(patient_id="NUL-2", patient_name="Good^Part", n=1)[0]
    async with http.post(f"{gateway.dicomweb}/studies", data=stow_body([bad, good], BOUNDARY), headers=h) as r:
        assert r.status == 202, await r.text()  # partly stored: the good part only
        out = await r.json()
    assert referenced_sops(out, "00081199") == [good.SOPInstanceUID]
    assert referenced_sops(out, "00081198") == [bad.SOPInstanceUID]
    failed = out["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC000]
    reason = json.dumps(out)
    assert field in reason and "control character" in reason
    async with http.get(f"{gateway.dicomweb}/studies/{bad.StudyInstanceUID}/series/{bad.SeriesInstanceUID}"
                        f"/instances/{bad.SOPInstanceUID}/metadata", headers=gateway.headers("admin")) as r:
        assert r.status == 404


@pytest.mark.parametrize("query", ["PatientName=a%00b", "PatientID=%00", "StudyDescription=x%01",
                                   "includefield=Patient%00Name"])
async def test_nul_in_qido_is_400_on_both_engines(gateway, http, query):
    async with http.get(f"{gateway.dicomweb}/studies?{query}", headers=gateway.headers("admin")) as r:
        text = await r.text()
        assert r.status == 400, text
        assert "control character" in text


@pytest.mark.parametrize("body", [
    {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
     "valueQuantity": {"value": 1, "code": "c" * 65, "unit": "u" * 300}},  # cm/idx VARCHAR(64) on PostgreSQL
    {"resourceType": "Patient", "birthDate": 0},  # a number where the projection expects text
    {"resourceType": "Condition", "subject": {"reference": "Patient/x"}, "code": {"text": "y"}, "onsetDateTime": 0},
])
async def test_derived_rows_fit_on_both_engines(gateway, http, body):
    """Found by the FHIR fuzz: what SQLite stored, PostgreSQL answered with a 500 (value too long for
    VARCHAR(64), an int for a text column). Now both engines give the same answer."""
    h = gateway.headers("ehr-system") | FHIR
    async with http.post(f"{gateway.fhir}/{body['resourceType']}", data=json.dumps(body), headers=h) as r:
        assert r.status in (201, 400, 422), await r.text()
        status = r.status
    if status == 201 and body["resourceType"] == "Observation":
        async with http.get(f"{gateway.fhir}/Observation?value-quantity=1||{'c' * 65}", headers=h) as r:
            assert r.status == 200, await r.text()


async def test_audit_trail_is_read_only_through_the_generic_routes(gateway, http):
    """AuditEvent is served from the audit store; POST/PUT/DELETE of /fhir/AuditEvent (alone or in a
    transaction) used to reach the generic routes and store an AuditEvent the audit search never shows.
    Now 405 with ``Allow: GET, HEAD`` (what openapi/fedgate.yaml documents), also for OPTIONS."""
    h = gateway.headers("admin") | FHIR
    ev = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2024-01-01T00:00:00Z",
          "agent": [{"requestor": True}], "source": {"observer": {"display": "x"}}}
    for method, path in [("POST", "/AuditEvent"), ("PUT", "/AuditEvent/a1"), ("DELETE", "/AuditEvent/a1"),
                         ("OPTIONS", "/AuditEvent"), ("OPTIONS", "/AuditEvent/a1")]:
        body = json.dumps(dict(ev, id="a1") if method == "PUT" else ev) if method in ("POST", "PUT") else None
        async with http.request(method, gateway.fhir + path, data=body, headers=h) as r:
            assert r.status == 405, (method, path, r.status, await r.text())
            assert r.headers["Allow"].replace(" ", "") == "GET,HEAD", (method, path, r.headers["Allow"])
            assert (await r.json())["resourceType"] == "OperationOutcome"
    txn = {"resourceType": "Bundle", "type": "transaction",
           "entry": [{"resource": ev, "request": {"method": "POST", "url": "AuditEvent"}}]}
    async with http.post(gateway.fhir, data=json.dumps(txn), headers=h) as r:
        assert r.status == 405, await r.text()
    async with http.get(f"{gateway.fhir}/_history?_count=0", headers=h) as r:
        assert (await r.json())["total"] == 0  # nothing reached the FHIR store
