"""Issue 22: the FHIR surface real clients expect — compartment search, system search (_type), PATCH (JSON
Patch + If-Match), Patient/$everything, SMART discovery and scopes — each through the consent gate.

The consent population and the hand-written permitted sets come from test_consent_enforcement (issue #4);
both engines.
"""

from __future__ import annotations

import time

import aiohttp
import jwt

from gateway.auth import smart_roles
from tests.integration.test_consent_enforcement import ALL, FHIR_JSON, PURPOSES, _load, _pid, site

PATCH_JSON = {"Content-Type": "application/json-patch+json"}


async def _json(http, method, url, headers, **kw):
    async with http.request(method, url, headers=headers, **kw) as r:
        return r.status, r.headers, await r.json(content_type=None)


def _res(bundle):
    return [e["resource"] for e in bundle.get("entry", [])]


async def _seen(gw, http, headers) -> dict[str, set]:
    """Patients visible through each new route."""
    out: dict[str, set] = {"compartment": set(), "everything": set(), "system": set()}
    for pid in sorted(ALL):
        st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/{pid}/Observation", headers)
        assert st == 200, b
        out["compartment"] |= {_pid(r) for r in _res(b)}
        assert all(r["resourceType"] == "Observation" and _pid(r) == pid for r in _res(b))
        st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/{pid}/$everything", headers)
        assert st in (200, 404), b
        if st == 200:
            assert {_pid(r) for r in _res(b)} == {pid}
            kinds = sorted(r["resourceType"] for r in _res(b))
            assert kinds[:1] + kinds[-2:] == ["Consent", "Observation", "Patient"] or "Consent" not in kinds
            assert kinds.count("Observation") == 2 and kinds.count("Patient") == 1
            out["everything"].add(pid)
    st, _, b = await _json(http, "GET", f"{gw.fhir}?_type=Patient,Observation&_count=1000", headers)
    assert st == 200, b
    out["system"] = {_pid(r) for r in _res(b)}
    assert b["total"] == len(_res(b)) == 3 * len(out["system"])
    return out


async def test_new_routes_return_exactly_the_permitted_patients(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        seen = await _seen(gw, http, gw.headers("clinician"))
        assert seen == {"compartment": ALL, "everything": ALL, "system": ALL}
        for name, (purpose, attrs, permitted, rule) in PURPOSES.items():
            seen = await _seen(gw, http, gw.headers("analyst", purpose=purpose, attrs=attrs))
            assert seen == {"compartment": permitted, "everything": permitted, "system": permitted}, f"{name}: {rule}"

        h = gw.headers("clinician")
        # paging over the types of a system search: pages partition the whole result
        got, url = [], f"{gw.fhir}?_type=Observation,Patient&_count=7"
        while url:
            st, _, b = await _json(http, "GET", url, h)
            assert st == 200 and b["total"] == 3 * len(ALL)
            got += [(r["resourceType"], r["id"]) for r in _res(b)]
            url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
        assert len(got) == len(set(got)) == 3 * len(ALL)
        # criteria apply to every type; errors are OperationOutcomes
        st, _, b = await _json(http, "GET", f"{gw.fhir}?_type=Patient,Observation&_id=p-gru,o-p-gru-1", h)
        assert sorted((r["resourceType"], r["id"]) for r in _res(b)) == [("Observation", "o-p-gru-1"), ("Patient", "p-gru")]
        for url, status in ((f"{gw.fhir}?_id=x", 400), (f"{gw.fhir}?_type=Nope", 404),
                            (f"{gw.fhir}/Patient/p-gru/Practitioner", 400),
                            (f"{gw.fhir}/Patient/p-gru/Observation?bogus=1", 400),
                            (f"{gw.fhir}/Patient/nobody/$everything", 404),
                            (f"{gw.fhir}/Patient/p-gru/$everything?_type=Organization", 400)):
            st, _, b = await _json(http, "GET", url, h)
            assert st == status and b["resourceType"] == "OperationOutcome", (url, st, b)
        # compartment search takes the type's own parameters
        st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/p-gru/Observation?value-quantity=61", h)
        assert [r["id"] for r in _res(b)] == ["o-p-gru-1"]
        st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/p-gru/$everything?_type=Observation", h)
        assert sorted(r["id"] for r in _res(b)) == ["o-p-gru-1", "o-p-gru-2"]
        # $everything also returns what the compartment references outside it (a performer), through the gate:
        # an analyst who may see the patient gets it, one who may not gets a 404 and nothing else
        w = gw.headers("ehr-system")
        st, _, b = await _json(http, "PUT", f"{gw.fhir}/Practitioner/dr-x", w | FHIR_JSON,
                               json={"resourceType": "Practitioner", "id": "dr-x", "name": [{"family": "X"}]})
        assert st in (200, 201), b
        st, _, obs = await _json(http, "GET", f"{gw.fhir}/Observation/o-p-gru-1", h)
        obs["performer"] = [{"reference": "Practitioner/dr-x"}]
        st, _, b = await _json(http, "PUT", f"{gw.fhir}/Observation/o-p-gru-1", w | FHIR_JSON, json=obs)
        assert st == 200, b
        for who in (h, gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})):
            st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/p-gru/$everything", who)
            got = {(r["resourceType"], r["id"]) for r in _res(b)}
            assert ("Practitioner", "dr-x") in got and ("Patient", "p-gru") in got, got
            assert {t for t, _ in got} >= {"Patient", "Observation", "Practitioner"}
        st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/p-hmb/$everything",
                               gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}))  # GRU: HMB refuses it
        assert st == 404 and b["resourceType"] == "OperationOutcome", b


async def test_patch(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        w = gw.headers("ehr-system")
        url = f"{gw.fhir}/Observation/o-p-gru-1"
        ops = [{"op": "test", "path": "/status", "value": "final"},
               {"op": "replace", "path": "/valueQuantity/value", "value": 99},
               {"op": "add", "path": "/note", "value": [{"text": "checked"}]}]
        st, hdr, b = await _json(http, "PATCH", url, w | PATCH_JSON, json=ops)
        assert st == 200, b
        assert b["valueQuantity"]["value"] == 99 and b["note"] == [{"text": "checked"}]
        assert hdr["ETag"] == 'W/"2"' and b["meta"]["versionId"] == "2"
        st, _, b = await _json(http, "GET", url, w)
        assert b["valueQuantity"]["value"] == 99
        # If-Match: a stale version → 412, nothing stored; the current one → 200
        st, _, b = await _json(http, "PATCH", url, w | PATCH_JSON | {"If-Match": 'W/"1"'},
                               json=[{"op": "remove", "path": "/note"}])
        assert st == 412 and b["resourceType"] == "OperationOutcome"
        st, _, b = await _json(http, "PATCH", url, w | PATCH_JSON | {"If-Match": 'W/"2"'},
                               json=[{"op": "remove", "path": "/note"}])
        assert st == 200 and "note" not in b and b["meta"]["versionId"] == "3"
        # failed test → 422; malformed patch → 400; a result that breaks the R4 JSON rules (a number for
        # a code) → 400, one the model refuses (no status) → 422; changing the id → 422; wrong media type
        # → 415; none of them store anything
        for body, status, ctype in (
                ([{"op": "test", "path": "/status", "value": "preliminary"}], 422, PATCH_JSON),
                ([{"op": "replace", "path": "/nope/x", "value": 1}], 400, PATCH_JSON),
                ({"op": "add"}, 400, PATCH_JSON),
                ([{"op": "jump", "path": "/status"}], 400, PATCH_JSON),
                ([{"op": "replace", "path": "/status", "value": 12}], 400, PATCH_JSON),
                ([{"op": "remove", "path": "/status"}], 422, PATCH_JSON),
                ([{"op": "replace", "path": "/id", "value": "other"}], 422, PATCH_JSON),
                ([{"op": "remove", "path": "/status"}], 415, FHIR_JSON)):
            st, _, b = await _json(http, "PATCH", url, w | ctype, json=body)
            assert st == status and b["resourceType"] == "OperationOutcome", (body, st, b)
        st, _, b = await _json(http, "GET", url, w)
        assert b["meta"]["versionId"] == "3"
        # analysts never write; a resource hidden by consent is a 404 to a writer that may not see it either
        analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        st, _, b = await _json(http, "PATCH", url, analyst | PATCH_JSON, json=[{"op": "remove", "path": "/note"}])
        assert st == 403
        st, _, b = await _json(http, "PATCH", f"{gw.fhir}/Observation/none", w | PATCH_JSON,
                               json=[{"op": "remove", "path": "/note"}])
        assert st == 404


def _smart_token(gw, scope: str, **extra) -> str:
    now = int(time.time())
    claims = {"sub": "smart-app", "iat": now, "exp": now + 600, "iss": gw.settings.jwt_issuer,
              "aud": gw.settings.jwt_audience, "scope": scope, **extra}
    return jwt.encode(claims, gw.settings.dev_secret(), algorithm="HS256")


def test_smart_scope_mapping():
    assert smart_roles("openid user/*.* launch") == (frozenset({"clinician"}), False)
    assert smart_roles("user/*.read") == (frozenset({"clinician"}), True)
    assert smart_roles("user/*.rs") == (frozenset({"clinician"}), True)
    assert smart_roles("user/*.cruds") == (frozenset({"clinician"}), False)
    assert smart_roles("system/*.read") == (frozenset({"ehr-system"}), True)
    assert smart_roles(["system/*.rs", "system/*.write"]) == (frozenset({"ehr-system"}), False)
    # one patient's scopes read only (test_smart_scopes.py); nonsense grants nothing (fail closed)
    assert smart_roles("patient/*.read") == (frozenset({"clinician"}), True)
    for scope in ("patient/*.write", "user/*.xyz", "user/*.sr", "user/*.rs?category=x", "", None, 7):
        assert smart_roles(scope) == (frozenset(), False), scope


async def test_smart_configuration_and_scoped_tokens(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        for url in (f"{gw.url}/.well-known/smart-configuration", f"{gw.fhir}/.well-known/smart-configuration"):
            st, _, b = await _json(http, "GET", url, {})
            assert st == 200 and "user/*.rs" in b["scopes_supported"] and "permission-v2" in b["capabilities"]
        st, _, cap = await _json(http, "GET", f"{gw.fhir}/metadata", {})
        codes = [c["code"] for s in cap["rest"][0]["security"]["service"] for c in s["coding"]]
        assert "SMART-on-FHIR" in codes and cap["patchFormat"] == ["application/json-patch+json"]
        assert {"code": "search-system"} in cap["rest"][0]["interaction"]

        read = {"Authorization": f"Bearer {_smart_token(gw, 'openid user/*.read')}"}
        st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient/p-none/$everything", read)
        assert st == 200  # user/ → clinician: treatment
        st, _, b = await _json(http, "PATCH", f"{gw.fhir}/Patient/p-none", read | PATCH_JSON,
                               json=[{"op": "replace", "path": "/gender", "value": "male"}])
        assert st == 403 and "read" in b["issue"][0]["diagnostics"]
        write = {"Authorization": f"Bearer {_smart_token(gw, 'user/*.cruds')}"}
        st, _, b = await _json(http, "PATCH", f"{gw.fhir}/Patient/p-none", write | PATCH_JSON,
                               json=[{"op": "replace", "path": "/gender", "value": "male"}])
        assert st == 200 and b["gender"] == "male"
        for scope, status in (("patient/*.read", 401), ("user/Observation.read", 403), ("user/Patient.read", 200)):
            st, _, b = await _json(http, "GET", f"{gw.fhir}/Patient",  # patient/: no launch patient → 401
                                   {"Authorization": f"Bearer {_smart_token(gw, scope)}"})
            assert st == status, scope
