"""SMART App Launch scopes mapped onto fedgate roles (docs/fhir.md "SMART scopes").

``patient/`` tokens (launch context ``patient`` claim, or ``fhirUser`` = Patient/x) read that patient's
compartment only, on every FHIR read path and DICOMweb, through the consent gate, and never write;
``user/`` and ``system/`` scopes act as clinician / ehr-system; per-type scopes narrow every path to their
types.  Tokens are signed like an OIDC issuer's would be (scope strings per SMART App Launch 2.x), over the
consent population of test_consent_enforcement, on both engines.
"""

from __future__ import annotations

import time

import aiohttp
import jwt
import pytest

from gateway.auth import smart_grant
from tests.dicom_synth import ct_series, stow_body
from tests.integration.test_consent_enforcement import (
    ALL,
    BOUNDARY,
    DICOM_MP,
    FHIR_JSON,
    _load,
    _pid,
    _resources,
    _stow_one_study_per_patient,
    _visible_everywhere,
    site,
)

__all__ = ["site"]
QIDO = {"Accept": "application/dicom+json"}


def _token(gw, scope: str, **claims) -> dict[str, str]:
    now = int(time.time())
    body = {"sub": "smart-app", "iat": now, "exp": now + 600, "iss": gw.settings.jwt_issuer,
            "aud": gw.settings.jwt_audience, "scope": scope, **claims}
    return {"Authorization": f"Bearer {jwt.encode(body, gw.settings.dev_secret(), algorithm='HS256')}"}


@pytest.mark.parametrize("scope, roles, read_only, types, patient_only", [
    ("patient/*.read", {"clinician"}, True, None, True),
    ("launch/patient openid fhirUser patient/*.rs", {"clinician"}, True, None, True),
    ("patient/Observation.read patient/Patient.rs", {"clinician"}, True, {"Observation", "Patient"}, True),
    ("patient/*.write patient/*.read", {"clinician"}, True, None, True),  # patient/ never writes here
    ("patient/*.cruds", {"clinician"}, True, None, True),
    ("user/*.*", {"clinician"}, False, None, False),
    ("user/*.read", {"clinician"}, True, None, False),
    ("user/*.cruds", {"clinician"}, False, None, False),
    ("user/Observation.rs", {"clinician"}, True, {"Observation"}, False),
    ("system/*.read", {"ehr-system"}, True, None, False),
    ("system/*.rs system/*.write", {"ehr-system"}, False, None, False),
    # user/ scopes decide when both are granted; patient/ ones cannot add types beyond them
    ("patient/*.read user/Observation.read", {"clinician"}, True, {"Observation"}, False),
])
def test_scope_strings(scope, roles, read_only, types, patient_only):
    g = smart_grant(scope)
    assert (g.roles, g.read_only, g.types, g.patient_only) == (
        frozenset(roles), read_only, frozenset(types) if types else None, patient_only)


@pytest.mark.parametrize("scope", [
    "patient/*.write",  # writes only, and patient/ never writes
    "patient/Observation.rs?category=laboratory",  # v2 query constraints: not enforceable here, so no grant
    "user/*.sr", "user/*.rr", "user/*.xyz", "user/observation.read", "usr/*.read", "openid fhirUser launch", "",
])
def test_scope_strings_granting_nothing(scope):
    assert smart_grant(scope).roles == frozenset()


async def test_patient_token_reads_only_its_compartment(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        uids = await _stow_one_study_per_patient(gw, http)
        for h in (_token(gw, "launch/patient openid fhirUser patient/*.read", patient="p-gru"),
                  _token(gw, "patient/*.rs", fhirUser="https://idp.example/fhir/Patient/p-gru")):
            seen = await _visible_everywhere(gw, http, h)
            counts = {k: seen.pop(k) for k in ("_summary=count/2", "_total", "token _summary=count/2")}
            # (the Consent of p-gru is in its compartment)
            assert seen == {k: {"p-gru"} for k in seen}, seen
            assert counts == {"_summary=count/2": 1, "_total": 1, "token _summary=count/2": 1}
            # another patient's compartment, $everything, system search: nothing of theirs
            async with http.get(f"{gw.fhir}/Patient/p-hmb/Observation", headers=h) as r:
                assert r.status == 200 and not _resources(await r.json())
            async with http.get(f"{gw.fhir}/Patient/p-hmb/$everything", headers=h) as r:
                assert r.status == 404 and (await r.json())["resourceType"] == "OperationOutcome"
            async with http.get(f"{gw.fhir}/Patient/p-gru/$everything", headers=h) as r:
                got = _resources(await r.json())
                assert r.status == 200 and {_pid(x) for x in got} == {"p-gru", None}
                # and what the compartment references outside it (its ImagingStudy's Endpoint)
                assert {x["resourceType"] for x in got if _pid(x) is None} <= {"Organization", "Endpoint"}
                assert sorted(x["resourceType"] for x in got).count("Observation") == 2
            async with http.get(f"{gw.fhir}", params={"_type": "Patient,Observation"}, headers=h) as r:
                assert {_pid(x) for x in _resources(await r.json())} == {"p-gru"}
            # DICOMweb: the patient's study only; another's is a 404
            async with http.get(f"{gw.dicomweb}/studies", headers=h | QIDO) as r:
                assert [i["00100020"]["Value"][0] for i in await r.json()] == ["p-gru"]
            st, se, sop = uids["p-hmb"]
            async with http.get(f"{gw.dicomweb}/studies/{st}/metadata", headers=h | QIDO) as r:
                assert r.status == 404
            st, se, sop = uids["p-gru"]
            async with http.get(f"{gw.dicomweb}/studies/{st}/metadata", headers=h | QIDO) as r:
                assert r.status == 200
            # writes refused: FHIR create/update/patch/delete, transaction, STOW
            for method, url, body, ctype in (
                    ("POST", f"{gw.fhir}/Observation", {
                        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
                        "subject": {"reference": "Patient/p-gru"}}, FHIR_JSON),
                    ("PUT", f"{gw.fhir}/Patient/p-gru", {"resourceType": "Patient", "id": "p-gru"}, FHIR_JSON),
                    ("PATCH", f"{gw.fhir}/Patient/p-gru", [{"op": "replace", "path": "/gender", "value": "male"}],
                     {"Content-Type": "application/json-patch+json"}),
                    ("DELETE", f"{gw.fhir}/Observation/o-p-gru-1", None, {}),
                    ("POST", gw.fhir, {"resourceType": "Bundle", "type": "transaction", "entry": []}, FHIR_JSON)):
                async with http.request(method, url, json=body, headers=h | ctype) as r:
                    assert r.status == 403, (method, url, r.status, await r.text())
            (ds,) = ct_series(patient_id="p-gru", patient_name="Test^p-gru", n=1, size=16)
            async with http.post(f"{gw.dicomweb}/studies", data=stow_body([ds], BOUNDARY),
                                 headers=h | {"Content-Type": DICOM_MP}) as r:
                assert r.status == 403, await r.text()
            # APIs the patient binding does not reach are refused outright
            for method, url in (("POST", f"{gw.url}/omop/export"), ("GET", f"{gw.url}/federation/sites"),
                                ("GET", f"{gw.url}/ui/fragments/consent"), ("GET", f"{gw.url}/inference/models"),
                                ("POST", f"{gw.url}/ui/fragments/cohort")):
                async with http.request(method, url, headers=h) as r:
                    assert r.status == 403, (url, r.status)
        async with http.get(f"{gw.fhir}/Observation/o-p-gru-1", headers=gw.headers("clinician")) as r:
            assert (await r.json())["meta"]["versionId"] == "1"  # nothing was written

        # no launch context, or a context that is no id: 401
        for claims in ({}, {"patient": "../x"}, {"fhirUser": "Practitioner/dr-x"}):
            async with http.get(f"{gw.fhir}/Patient", headers=_token(gw, "patient/*.read", **claims)) as r:
                assert r.status == 401, claims
        # the consent gate still decides: a patient/ token acts as a clinician, which the gate refuses a
        # research purpose; an analyst's token (roles claim) with patient/ scopes is narrowed to the patient
        # and gated by consent: GRU research sees p-gru, and nothing of p-hmb (whose Consent refuses GRU)
        h = _token(gw, "patient/*.read", patient="p-gru", purpose={"codes": ["DUO:0000042"]})
        async with http.get(f"{gw.fhir}/Patient/p-gru", headers=h) as r:
            assert r.status == 403
        gru = {"roles": ["analyst"], "purpose": {"codes": ["DUO:0000042"]}}
        async with http.get(f"{gw.fhir}/Patient/p-hmb", headers=_token(gw, "patient/*.read", patient="p-hmb",
                                                                        **gru)) as r:
            assert r.status == 404
        async with http.get(f"{gw.fhir}/Observation", headers=_token(gw, "patient/*.read", patient="p-gru",
                                                                      **gru)) as r:
            assert {_pid(x) for x in _resources(await r.json())} == {"p-gru"}


async def test_per_type_scopes(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        await _stow_one_study_per_patient(gw, http)
        h = _token(gw, "patient/Observation.read", patient="p-gru")
        async with http.get(f"{gw.fhir}/Observation", headers=h) as r:
            assert {x["id"] for x in _resources(await r.json())} == {"o-p-gru-1", "o-p-gru-2"}
        async with http.get(f"{gw.fhir}/Observation", params={"_include": "Observation:subject"}, headers=h) as r:
            assert {x["resourceType"] for x in _resources(await r.json())} == {"Observation"}
        async with http.get(f"{gw.fhir}/Patient/p-gru/$everything", headers=h) as r:
            assert r.status == 200 and {x["resourceType"] for x in _resources(await r.json())} == {"Observation"}
        for url in (f"{gw.fhir}/Patient/p-gru", f"{gw.fhir}/Patient", f"{gw.fhir}/Consent", f"{gw.fhir}/_history",
                    f"{gw.fhir}?_type=Patient,Observation", f"{gw.fhir}/Patient/p-gru/Consent",
                    f"{gw.dicomweb}/studies"):
            async with http.get(url, headers=h | (QIDO if "dicomweb" in url else {})) as r:
                assert r.status == 403, (url, r.status)
        # user/ per-type: every patient's Observations (treatment), nothing else
        h = _token(gw, "user/Observation.rs")
        async with http.get(f"{gw.fhir}/Observation", params={"_count": "100"}, headers=h) as r:
            assert {_pid(x) for x in _resources(await r.json())} == ALL
        async with http.get(f"{gw.fhir}/Patient/p-gru", headers=h) as r:
            assert r.status == 403
        # a write scope for one type writes that type only
        h = _token(gw, "user/Observation.cruds")
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient/p-gru"}}
        async with http.post(f"{gw.fhir}/Observation", json=obs, headers=h | FHIR_JSON) as r:
            assert r.status == 201, await r.text()
        async with http.post(f"{gw.fhir}/Patient", json={"resourceType": "Patient"}, headers=h | FHIR_JSON) as r:
            assert r.status == 403


async def test_user_and_system_scopes_read_and_write(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient/p-gru"}}
        for scope, writes in (("user/*.read", False), ("user/*.rs", False), ("system/*.read", False),
                              ("user/*.*", True), ("user/*.cruds", True), ("system/*.cruds", True)):
            h = _token(gw, scope)
            async with http.get(f"{gw.fhir}/Patient", params={"_count": "100"}, headers=h) as r:
                assert {x["id"] for x in _resources(await r.json())} == ALL, scope
            async with http.get(f"{gw.fhir}/Patient/p-hmb/$everything", headers=h) as r:
                assert r.status == 200, scope
            async with http.post(f"{gw.fhir}/Observation", json=obs, headers=h | FHIR_JSON) as r:
                assert r.status == (201 if writes else 403), (scope, r.status)
        # a scope fedgate cannot enforce grants nothing: 401 (fail closed), never a wider read
        async with http.get(f"{gw.fhir}/Observation",
                            headers=_token(gw, "user/Observation.rs?category=laboratory")) as r:
            assert r.status == 401


async def test_smart_configuration_lists_what_is_enforced(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.fhir}/.well-known/smart-configuration") as r:
            doc = await r.json()
    for scope in doc["scopes_supported"]:
        if "/" in scope and not scope.startswith("launch/"):
            assert smart_grant(scope).roles, scope  # every data scope listed is one fedgate grants
    assert {"patient/*.read", "patient/*.rs", "user/*.cruds", "system/*.read"} <= set(doc["scopes_supported"])
    assert {"permission-patient", "permission-user", "permission-v1", "permission-v2"} <= set(doc["capabilities"])
    assert "patient/*.write" not in doc["scopes_supported"]
