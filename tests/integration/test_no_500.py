"""Issue 19's list of requests that answered 500: each now gets the protocol's own 4xx (FHIR
OperationOutcome, DICOMweb/federation problem+json, 401 with WWW-Authenticate), on both engines — and
the supported sorts actually sort."""

from __future__ import annotations

import json

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import make_settings, start_gateway

FHIR_JSON = {"Content-Type": "application/fhir+json"}
HUGE = "9" * 25  # beyond a signed 64-bit integer


def _nested_extension(depth: int) -> dict:
    ext: dict = {"url": "http://example.org/e", "valueString": "leaf"}
    for _ in range(depth):
        ext = {"url": "http://example.org/e", "extension": [ext]}
    return ext


def _nested_not(depth: int) -> dict:
    doc: dict = {"sex": "female"}
    for _ in range(depth):
        doc = {"not": doc}
    return doc


# (case, path, expected status, protocol form)
GETS = [
    ("_sort by a string param", "/fhir/Patient?_sort=name", 200, "fhir"),
    ("_sort by a token param", "/fhir/Patient?_sort=-gender", 200, "fhir"),
    ("_sort by a reference param", "/fhir/Observation?_sort=subject", 200, "fhir"),
    ("_sort by a number param", "/fhir/RiskAssessment?_sort=probability", 400, "fhir"),
    ("_sort by an unknown param", "/fhir/Patient?_sort=colour", 400, "fhir"),
    ("_offset beyond 64 bits", f"/fhir/Patient?_offset={HUGE}", 400, "fhir"),
    ("_offset at 2^63", f"/fhir/Patient?_offset={2**63}", 400, "fhir"),
    ("_history version beyond 64 bits", f"/fhir/Patient/p1/_history/{HUGE}", 404, "fhir"),
    ("history _offset beyond 64 bits", f"/fhir/Patient/p1/_history?_offset={HUGE}", 400, "fhir"),
    ("AuditEvent id beyond 64 bits", f"/fhir/AuditEvent/{HUGE}", 404, "fhir"),
    ("QIDO StudyDate=abc", "/dicomweb/studies?StudyDate=abc", 400, "problem"),
    ("QIDO Rows=abc", "/dicomweb/instances?Rows=abc", 400, "problem"),
    ("QIDO offset beyond 64 bits", f"/dicomweb/studies?offset={HUGE}", 400, "problem"),
]


async def _check_form(r: aiohttp.ClientResponse, form: str) -> dict:
    body = await r.json(content_type=None)
    if form == "fhir":
        assert body["resourceType"] == ("OperationOutcome" if r.status >= 400 else "Bundle"), body
    else:
        assert r.status >= 400 and body["status"] == r.status and body["detail"], body
    return body


async def test_the_500_list_answers_4xx(gateway):
    h = gateway.headers("admin")
    async with aiohttp.ClientSession() as http:
        for fam, given, gender in (("Zeta", "Ann", "female"), ("Alpha", "Bob", "male"), ("Mu", "Cy", "other")):
            pat = {"resourceType": "Patient", "id": f"p-{fam.lower()}", "gender": gender,
                   "name": [{"family": fam, "given": [given]}]}
            async with http.put(f"{gateway.fhir}/Patient/{pat['id']}", json=pat, headers=h | FHIR_JSON) as r:
                assert r.status == 201, await r.text()
        async with http.put(f"{gateway.fhir}/Patient/p1", json={"resourceType": "Patient", "id": "p1"},
                            headers=h | FHIR_JSON) as r:
            assert r.status == 201
        for case, path, status, form in GETS:
            async with http.get(gateway.url + path, headers=h) as r:
                assert r.status == status, (case, r.status, await r.text())
                await _check_form(r, form)
        # the supported sorts sort: string (name: family then given), token (gender), descending
        async with http.get(f"{gateway.fhir}/Patient?_sort=name&name:exact=Zeta,Alpha,Mu", headers=h) as r:
            ids = [e["resource"]["id"] for e in (await r.json())["entry"]]
        async with http.get(f"{gateway.fhir}/Patient?_sort=family", headers=h) as r:
            fam_ids = [e["resource"]["id"] for e in (await r.json()).get("entry", []) if e["resource"]["id"] != "p1"]
        assert fam_ids == ["p-alpha", "p-mu", "p-zeta"], fam_ids
        async with http.get(f"{gateway.fhir}/Patient?_sort=-family", headers=h) as r:
            fam_ids = [e["resource"]["id"] for e in (await r.json()).get("entry", []) if e["resource"]["id"] != "p1"]
        assert fam_ids == ["p-zeta", "p-mu", "p-alpha"], fam_ids
        async with http.get(f"{gateway.fhir}/Patient?_sort=gender,-family", headers=h) as r:
            g_ids = [e["resource"]["id"] for e in (await r.json()).get("entry", []) if e["resource"]["id"] != "p1"]
        assert g_ids == ["p-zeta", "p-alpha", "p-mu"], g_ids  # female < male < other
        del ids

        # a resource with 400-deep nested extensions: 400 OperationOutcome, alone and in a transaction
        deep = {"resourceType": "Patient", "extension": [_nested_extension(400)]}
        async with http.post(f"{gateway.fhir}/Patient", data=json.dumps(deep), headers=h | FHIR_JSON) as r:
            assert r.status == 400, await r.text()
            assert "nests deeper" in (await _check_form(r, "fhir"))["issue"][0]["diagnostics"]
        txn = {"resourceType": "Bundle", "type": "transaction",
               "entry": [{"resource": deep, "request": {"method": "POST", "url": "Patient"}}]}
        async with http.post(gateway.fhir, data=json.dumps(txn), headers=h | FHIR_JSON) as r:
            assert r.status == 400, await r.text()
        shallow = {"resourceType": "Patient", "extension": [_nested_extension(20)]}  # deep but sane: stored
        async with http.post(f"{gateway.fhir}/Patient", data=json.dumps(shallow), headers=h | FHIR_JSON) as r:
            assert r.status == 201, await r.text()

        # cohorts: 900 nested `not`, an `any` of 5,000 leaves -> 400 problem+json naming the limit
        analyst = gateway.headers("analyst", purpose={"codes": ["DUO:0000042"]}, attrs={"irb_approved": True})
        for cohort in (_nested_not(900), {"any": [{"sex": "female"}] * 5000}):
            async with http.post(f"{gateway.url}/federation/cohort/count", json={"cohort": cohort},
                                 headers=analyst) as r:
                assert r.status == 400, await r.text()
                assert "at most" in (await _check_form(r, "problem"))["detail"]
        async with http.post(f"{gateway.url}/federation/cohort/count", json={"cohort": _nested_not(10)},
                             headers=analyst) as r:
            assert r.status == 200, await r.text()


async def test_es256_token_against_an_rsa_jwks_is_401(tmp_path, db_url):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk | {"kid": "r1", "alg": "RS256", "use": "sig"}]}))
    settings = make_settings(tmp_path / "data", db_url, jwks=str(jwks), jwt_issuer="https://idp.example",
                             jwt_audience="fedgate-prod")
    gw = await start_gateway(settings)
    import time

    claims = {"sub": "x", "roles": ["admin"], "exp": int(time.time()) + 300, "iss": "https://idp.example",
              "aud": "fedgate-prod"}
    ec_key = ec.generate_private_key(ec.SECP256R1())
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({"kid": "r1"}, {}):
                token = jwt.encode(claims, ec_key, algorithm="ES256", headers=headers)
                async with http.get(f"{gw.fhir}/Patient", headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 401, await r.text()
                    assert "invalid_token" in r.headers["WWW-Authenticate"]
                    assert (await r.json())["resourceType"] == "OperationOutcome"
            ok = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "r1"})
            async with http.get(f"{gw.fhir}/Patient", headers={"Authorization": f"Bearer {ok}"}) as r:
                assert r.status == 200
    finally:
        await gw.server.close()


@pytest.mark.parametrize("depth,ok", [(32, True), (33, False)])
def test_cohort_depth_bound_is_exact(depth, ok):
    from mappings.cohort.language import CohortError, parse

    doc = _nested_not(depth - 1)  # depth counts the leaf
    if ok:
        parse(doc)
    else:
        with pytest.raises(CohortError):
            parse(doc)
