"""Issue 28: what the console's consent view and fragments compute, on both engines, checked against values
written here from the loaded consents (DUO.md semantics), and the console's role rules: the consent view is for
stewards (admin, site), the audit view for admins, and a steward with a research purpose sees only the
patients that purpose permits (the gate's scope), never a refused one."""

from __future__ import annotations

import datetime as _dt

import aiohttp
import pytest

from gateway import keys
from gateway.context import Purpose, Requester
from gateway.errors import Forbidden, NotFound
from gateway.vocab_cli import load_demo
from tests.conftest import make_settings, start_gateway

DUO = "http://purl.obolibrary.org/obo/duo"
#: patient → (DUO permission, diseases) of its one research Consent; None = no consent
PATIENTS = {"g1": ("DUO:0000042", ()), "g2": ("DUO:0000042", ()), "h1": ("DUO:0000006", ()),
            "d1": ("DUO:0000007", ("MONDO:0004995",)), "n1": None, "w1": ("DUO:0000042", ())}
WITHDRAWN = "w1"


def _consent(pid: str, perm: str, diseases) -> dict:
    prov: dict = {"type": "permit", "purpose": [{"system": DUO, "code": perm}]}
    if diseases:
        prov["code"] = [{"coding": [{"system": "http://purl.obolibrary.org/obo/mondo.owl", "code": d}]} for d in diseases]
    return {"resourceType": "Consent", "id": f"c-{pid}", "status": "active", "patient": {"reference": f"Patient/{pid}"},
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "policyRule": {"coding": [{"system": DUO, "code": perm}]}, "provision": prov}


@pytest.fixture
async def site(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, extra={"consent": {"refresh_s": 0}}))
    await load_demo(gw.app[keys.DB])  # the disease hierarchy (MONDO) a disease-specific consent is matched in
    entries = []
    for pid, c in PATIENTS.items():
        res = [{"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1970-01-01"}]
        if c is not None:
            res.append(_consent(pid, *c))
        entries += [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in res]
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.fhir, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                             headers=gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}) as r:
            assert r.status == 200, await r.text()
        withdrawn = _consent(WITHDRAWN, *PATIENTS[WITHDRAWN]) | {"status": "inactive"}
        async with http.put(f"{gw.fhir}/Consent/c-{WITHDRAWN}", json=withdrawn,
                            headers=gw.headers("admin") | {"Content-Type": "application/fhir+json"}) as r:
            assert r.status == 200, await r.text()
        yield gw, http
    await gw.server.close()


TREATMENT = Purpose()


def _who(role: str, purpose: Purpose = TREATMENT) -> Requester:
    return Requester(f"t-{role}", frozenset({role}), None, {}, purpose)


async def test_consent_matrix_withdrawals_and_decision(site):
    gw, _ = site
    report = gw.app[keys.CONSENT_REPORT]
    m = await report.matrix(_who("admin"))
    labels = [p["label"] for p in m["purposes"]]
    gru, hmb, ds = labels.index("General research (GRU)"), labels.index("Health/medical/biomedical (HMB)"), \
        labels.index("Disease-specific: cardiovascular")
    # GRU request: GRU consents only; HMB request: GRU and HMB; cardiovascular DS request: GRU, HMB and DS-CVD
    assert m["totals"][gru] == 2 and m["totals"][hmb] == 3 and m["totals"][ds] == 4
    assert m["patients"] == len(PATIENTS) and m["no_profile"] == 2  # n1 (none) and w1 (withdrawn)
    assert sum(r["patients"] for r in m["profiles"]) == len(PATIENTS) - 2

    days = await report.withdrawals(_who("site"))
    assert days == [{"day": _dt.datetime.now(_dt.UTC).date().isoformat(), "withdrawn": 1}]

    d = await report.decision(_who("admin"), "h1", "DUO:0000042")
    assert d["decision"] == "deny" and d["entries"][0]["decision"] == "deny" and d["entries"][0]["reasons"]
    d = await report.decision(_who("admin"), "h1", "DUO:0000006")
    assert d["decision"] == "permit"
    d = await report.decision(_who("admin"), WITHDRAWN, "DUO:0000006")
    assert d["decision"] == "deny" and "withdrawn" in d["reasons"][0] and d["consents"][0]["status"] == "inactive"

    # a steward with a research purpose sees only what that purpose permits
    research = _who("admin", Purpose("research", ("DUO:0000042",)))
    m = await report.matrix(research)
    assert m["patients"] == 2
    with pytest.raises(NotFound):
        await report.decision(research, "h1", "DUO:0000006")
    with pytest.raises(Forbidden):
        await report.matrix(_who("analyst", Purpose("research", ("DUO:0000042",))))


async def test_fragments_render_and_refuse(site):
    gw, http = site
    async with http.get(gw.url + "/ui/fragments/consent", headers=gw.headers("admin")) as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
    assert 'id="consent-matrix"' in html and "data-spec=" in html
    async with http.get(gw.url + "/ui/fragments/consent/decision", params={"patient": "d1", "purpose": "DUO:0000006"},
                        headers=gw.headers("admin")) as r:
        assert r.status == 200
        assert "permit" in await r.text()
    async with http.get(gw.url + "/ui/fragments/consent/decision", params={"patient": "d1", "purpose": "treatment"},
                        headers=gw.headers("admin")) as r:
        assert r.status == 400 and "purpose" in (await r.json(content_type=None))["detail"]
    analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
    for path in ("/ui/fragments/consent", "/ui/fragments/audit", "/ui/fragments/audit/verify"):
        async with http.get(gw.url + path, headers=analyst) as r:
            assert r.status == 403, path
    async with http.get(gw.url + "/ui/fragments/consent", headers={}) as r:
        assert r.status == 401
    async with http.get(gw.url + "/ui/fragments/audit", params={"patient": "h1"}, headers=gw.headers("admin")) as r:
        assert r.status == 200 and "Patient/h1" in await r.text()
    async with http.get(gw.url + "/ui/fragments/audit/verify", headers=gw.headers("admin")) as r:
        assert r.status == 200 and "Intact" in await r.text()
    async with http.get(gw.url + "/ui/fragments/cohort", headers=gw.headers("admin")) as r:
        assert r.status == 405
    async with http.post(gw.url + "/ui/fragments/cohort", data={"cohort_json": "{}"}, headers=gw.headers("admin")) as r:
        assert r.status == 404  # not a hub
    for page in ("/ui/", "/ui/consent", "/ui/models", "/ui/audit"):
        async with http.get(gw.url + page) as r:
            assert r.status == 200 and "/viewer/login" in await r.text(), page
    async with http.get(gw.url + "/ui/nope") as r:
        assert r.status == 404
