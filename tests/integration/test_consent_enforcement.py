"""Consent enforcement on every FHIR read path (issue #4, "Enforcement").

A population with mixed consents is loaded through the FHIR API (ehr-system role).  For each research
purpose + requester attestations, every FHIR route — read, search, _include/_revinclude, history,
_summary=count, _total — must return exactly the data of the patients the table below says are
permitted, and nothing else.  The expected sets are written by hand from DUO.md's rules (cited per
row), not computed by the evaluator.  Withdrawal (Consent → inactive) takes effect on the next
request.  Clinical roles see everything for treatment and are refused research; analysts are
refused treatment.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway import keys
from gateway.app import create_app
from gateway.services.consent import ConsentGate
from tests.conftest import Gateway, make_settings

OBO = Path(__file__).resolve().parents[1] / "unit" / "ontologies" / "data" / "mini_mondo.obo"
DUO = "http://purl.obolibrary.org/obo/duo"
MONDO = "http://purl.obolibrary.org/obo/mondo"
EXT = "https://fedgate.dev/fhir/StructureDefinition/duo-"
FHIR_JSON = {"Content-Type": "application/fhir+json"}

#: patient id → (DUO codes on its Consent, disease codings, extra Consent fields); None = no Consent.
POPULATION = {
    "p-gru": (["DUO:0000042"], [], {}),
    "p-hmb": (["DUO:0000006"], [], {}),
    "p-ds-cancer-ncu": (["DUO:0000007", "DUO:0000046"], ["0004992"], {}),
    "p-poa": (["DUO:0000011"], [], {}),
    "p-irb": (["DUO:0000042", "DUO:0000021"], [], {}),
    "p-withdrawn": (["DUO:0000042"], [], {"status": "inactive"}),
    "p-expired": (["DUO:0000042"], [], {"period": {"start": "2015-01-01", "end": "2020-12-31"}}),
    "p-rejected": (["DUO:0000042"], [], {"status": "rejected"}),
    "p-optout": (["DUO:0000042"], [], {"type": "deny"}),
    "p-none": None,
    "p-retro": None,  # no Consent; the site policy gives its collection HMB + IRB
}

# purpose name → (token purpose, token attrs, permitted patients by hand, rule)
PURPOSES = {
    "gru": ({"codes": ["DUO:0000042"]}, {},
            {"p-gru"},
            "DUO.md: GRU request matches GRU only (HMB/DS/POA deny GRU-level; IRB unattested → not permit)"),
    "biomedical+irb": ({"codes": ["DUO:0000037"]}, {"irb_approved": True},
                       {"p-gru", "p-hmb", "p-irb", "p-retro"},
                       "DUO.md: 37 ⊑ HMB-level → GRU, HMB, GRU+IRB (attested), policy HMB+IRB; DS needs a disease"),
    "melanoma+noncommercial": ({"codes": ["DUO:0000040"], "diseases": ["MONDO:0005105"]},
                               {"commercial_purpose": False},
                               {"p-gru", "p-hmb", "p-ds-cancer-ncu"},
                               "DUO.md: DS-cancer permits melanoma ⊑ cancer; NCU attested; IRB unattested"),
    "melanoma+commercial": ({"codes": ["DUO:0000040"], "diseases": ["MONDO:0005105"]},
                            {"commercial_purpose": True, "irb_approved": True},
                            {"p-gru", "p-hmb", "p-irb", "p-retro"},
                            "DUO.md: NCU denies a commercial purpose"),
    "ancestry": ({"codes": ["DUO:0000033"]}, {"irb_approved": True},
                 {"p-gru", "p-poa", "p-irb"},
                 "DUO.md: GRU permits ancestry; POA permits 33; HMB/DS deny ancestry"),
    "diabetes-disease": ({"codes": ["DUO:0000040"], "diseases": ["MONDO:0005148"]}, {"commercial_purpose": False},
                         {"p-gru", "p-hmb"},
                         "DUO.md: DS-cancer does not permit type 2 diabetes"),
}
ALL = set(POPULATION)


def consent(pid: str, codes, diseases, extra) -> dict:
    provision: dict = {
        "type": extra.get("type", "permit"),
        "purpose": [{"system": DUO, "code": c} for c in codes if c in ("DUO:0000042", "DUO:0000006",
                                                                      "DUO:0000007", "DUO:0000011")],
        "code": [{"coding": [{"system": DUO, "code": c}]} for c in codes
                 if c not in ("DUO:0000042", "DUO:0000006", "DUO:0000007", "DUO:0000011")]
        + [{"coding": [{"system": MONDO, "code": f"MONDO:{d}"}]} for d in diseases],
    }
    if "period" in extra:
        provision["period"] = extra["period"]
    provision = {k: v for k, v in provision.items() if v != []}  # R4 JSON: no empty arrays
    return {
        "resourceType": "Consent", "id": f"c-{pid}", "status": extra.get("status", "active"),
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "policyRule": {"coding": [{"system": DUO, "code": codes[0]}]},
        "provision": provision,
    }


def patient(pid: str) -> dict:
    system = "urn:fedgate:retro-cohort" if pid == "p-retro" else "urn:fedgate:test"
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": system, "value": pid}],
            "gender": "female", "birthDate": "1970-01-01", "name": [{"family": f"Fam-{pid}"}]}


def observation(pid: str, n: int) -> dict:
    return {"resourceType": "Observation", "id": f"o-{pid}-{n}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 60 + n, "unit": "/min"}}


POLICY = {"collections": [{
    "name": "retro-cohort-ethics-waiver",
    "match": {"identifier_system": "urn:fedgate:retro-cohort"},
    "consent": {"permission": "DUO:0000006", "modifiers": ["DUO:0000021"]},
}]}


@pytest.fixture
async def site(tmp_path, db_url):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    settings = make_settings(tmp_path / "data", db_url,
                             extra={"consent": {"policy": str(policy), "disease_ontologies": [str(OBO)],
                                                         "refresh_s": 0}})
    app = create_app(settings)
    app[keys.GATE] = ConsentGate(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Gateway(server, settings)
    finally:
        await server.close()


async def _load(gw: Gateway, http: aiohttp.ClientSession) -> None:
    entries = [{"resource": {"resourceType": "Organization", "id": "org-1", "name": "Site"},
                "request": {"method": "PUT", "url": "Organization/org-1"}}]
    for pid, spec in POPULATION.items():
        resources = [patient(pid), observation(pid, 1), observation(pid, 2)]
        if spec is not None:
            resources.append(consent(pid, *spec))
        entries += [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                    for r in resources]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    async with http.post(gw.fhir, json=bundle, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
        assert r.status == 200, await r.text()


def _pid(resource: dict) -> str | None:
    if resource["resourceType"] == "Patient":
        return resource["id"]
    for key in ("subject", "patient"):
        if key in resource:
            return resource[key]["reference"].split("/")[1]
    return None


async def _bundle(http, url, headers, **params) -> dict:
    async with http.get(url, params=params, headers=headers) as r:
        assert r.status == 200, (url, params, await r.text())
        return await r.json()


def _resources(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]


async def _visible_everywhere(gw: Gateway, http, headers) -> dict[str, set]:
    """The set of patients whose data each route returns."""
    seen: dict[str, set] = {}
    f = gw.fhir
    b = await _bundle(http, f"{f}/Patient", headers, _count="100")
    seen["Patient search"] = {_pid(r) for r in _resources(b)}
    b = await _bundle(http, f"{f}/Observation", headers, _count="100")
    obs = _resources(b)
    seen["Observation search"] = {_pid(r) for r in obs}
    assert len(obs) == 2 * len(seen["Observation search"])
    b = await _bundle(http, f"{f}/Observation", headers, _include="Observation:subject", _count="100")
    seen["_include"] = {_pid(r) for r in _resources(b)}
    b = await _bundle(http, f"{f}/Patient", headers, _revinclude="Observation:subject", _count="100")
    seen["_revinclude"] = {_pid(r) for r in _resources(b)}
    b = await _bundle(http, f"{f}/Consent", headers, _count="100")
    seen["Consent search"] = {_pid(r) for r in _resources(b)}
    b = await _bundle(http, f"{f}/Observation", headers, _summary="count")
    seen["_summary=count/2"] = b["total"] / 2
    b = await _bundle(http, f"{f}/Patient", headers, _total="accurate", _count="1")
    seen["_total"] = b["total"]
    # searches driven by an index lookup (the gate is then part of that lookup: idx_* consent_no), one
    # per index table
    for label, url, params in (
            ("token search", f"{f}/Observation", {"code": "http://loinc.org|8867-4"}),
            ("token search (no system)", f"{f}/Patient", {"gender": "female"}),
            ("string search", f"{f}/Patient", {"family": "Fam"}),
            ("date search", f"{f}/Patient", {"birthdate": "1970-01-01"}),
            ("reference search", f"{f}/Observation", {"subject": ",".join(f"Patient/{p}" for p in sorted(ALL))}),
            ("quantity search", f"{f}/Observation", {"value-quantity": "ge0"})):
        seen[label] = {_pid(r) for r in _resources(await _bundle(http, url, headers, _count="100", **params))}
    b = await _bundle(http, f"{f}/Observation", headers, code="http://loinc.org|8867-4", _summary="count")
    seen["token _summary=count/2"] = b["total"] / 2
    b = await _bundle(http, f"{f}/Observation/_history", headers, _count="100")
    seen["type history"] = {_pid(r) for r in _resources(b) if r}
    b = await _bundle(http, f"{f}/_history", headers, _count="500")
    seen["system history"] = {_pid(r) for r in _resources(b) if r} - {None}
    read, vread, ihist = set(), set(), set()
    for pid in ALL:
        async with http.get(f"{f}/Patient/{pid}", headers=headers) as r:
            assert r.status in (200, 404), await r.text()
            if r.status == 200:
                read.add(pid)
            else:
                assert (await r.json())["resourceType"] == "OperationOutcome"
        async with http.get(f"{f}/Observation/o-{pid}-1/_history/1", headers=headers) as r:
            assert r.status in (200, 404)
            if r.status == 200:
                vread.add(pid)
        async with http.get(f"{f}/Patient/{pid}/_history", headers=headers) as r:
            assert r.status in (200, 404)
            if r.status == 200 and (await r.json()).get("entry"):
                ihist.add(pid)
    seen["read"], seen["vread"], seen["instance history"] = read, vread, ihist
    async with http.get(f"{f}/Organization/org-1", headers=headers) as r:
        assert r.status == 200  # no patient compartment: visible to every authenticated role
    return seen


def _expect(permitted: set) -> dict:
    with_consent = {p for p in permitted if POPULATION[p] is not None}
    return {
        "Patient search": permitted, "Observation search": permitted, "_include": permitted,
        "_revinclude": permitted, "Consent search": with_consent, "_summary=count/2": len(permitted),
        "_total": len(permitted), "type history": permitted, "system history": permitted, "read": permitted,
        "vread": permitted, "instance history": permitted,
        "token search": permitted, "token search (no system)": permitted, "string search": permitted,
        "date search": permitted, "reference search": permitted, "quantity search": permitted,
        "token _summary=count/2": len(permitted),
    }


async def test_every_fhir_route_returns_exactly_the_permitted_patients(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        # treatment: clinical roles see everyone
        seen = await _visible_everywhere(gw, http, gw.headers("clinician"))
        assert seen["Patient search"] == ALL and seen["read"] == ALL
        for name, (purpose, attrs, permitted, rule) in PURPOSES.items():
            seen = await _visible_everywhere(gw, http, gw.headers("analyst", purpose=purpose, attrs=attrs))
            assert seen == _expect(permitted), f"{name}: {rule}"

        # the purpose may also come as a header
        h = gw.headers("analyst", attrs={"irb_approved": True}) | {"X-Purpose-Of-Use": "DUO:0000037"}
        seen = await _visible_everywhere(gw, http, h)
        assert seen["Patient search"] == PURPOSES["biomedical+irb"][2]

        # clinical role asking research → 403; analyst asking treatment → 403 (OperationOutcome)
        for headers in (gw.headers("clinician", purpose={"codes": ["DUO:0000042"]}),
                        gw.headers("analyst", purpose="treatment")):
            async with http.get(f"{gw.fhir}/Patient", headers=headers) as r:
                assert r.status == 403
                assert (await r.json())["resourceType"] == "OperationOutcome"

        # malformed requester attributes → 403 every time,
        # and the same analyst with valid attributes right after is served
        for attrs in ({"irb_approved": "yes"}, {"irb_approved": "yes"}, {"irb_approved": True}):
            h = gw.headers("analyst", purpose={"codes": ["DUO:0000037"]}, attrs=attrs)
            async with http.get(f"{gw.fhir}/Patient", headers=h) as r:
                assert r.status == (200 if attrs["irb_approved"] is True else 403), await r.text()

        # withdrawal takes effect on the very next request
        gru = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        withdrawn = consent("p-gru", ["DUO:0000042"], [], {"status": "inactive"})
        async with http.put(f"{gw.fhir}/Consent/c-p-gru", json=withdrawn, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 200, await r.text()
        seen = await _visible_everywhere(gw, http, gru)
        assert seen == _expect(set())
        # re-consent (a new Consent, active) → visible again; delete it → gone again
        again = consent("p-gru", ["DUO:0000042"], [], {}) | {"id": "c-p-gru-2"}
        async with http.put(f"{gw.fhir}/Consent/c-p-gru-2", json=again, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 201, await r.text()
        assert (await _visible_everywhere(gw, http, gru))["Patient search"] == {"p-gru"}
        async with http.delete(f"{gw.fhir}/Consent/c-p-gru-2", headers=gw.headers("ehr-system")) as r:
            assert r.status in (200, 204)
        assert (await _visible_everywhere(gw, http, gru))["Patient search"] == set()


async def test_analysts_cannot_write_a_consent_for_themselves(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        ana = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        grant = consent("p-none", ["DUO:0000042"], [], {})
        async with http.put(f"{gw.fhir}/Consent/c-p-none", json=grant, headers=ana | FHIR_JSON) as r:
            assert r.status == 403 and (await r.json())["resourceType"] == "OperationOutcome"
        async with http.post(f"{gw.fhir}/Consent", json=grant, headers=ana | FHIR_JSON) as r:
            assert r.status == 403
        tx = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": grant, "request": {"method": "PUT", "url": "Consent/c-p-none"}}]}
        async with http.post(gw.fhir, json=tx, headers=ana | FHIR_JSON) as r:
            assert r.status == 403
        async with http.delete(f"{gw.fhir}/Consent/c-p-gru", headers=ana) as r:
            assert r.status == 403
        async with http.get(f"{gw.fhir}/Patient", headers=ana) as r:
            assert {e["resource"]["id"] for e in (await r.json()).get("entry", [])} == {"p-gru"}


# ------------------------------------------------------------------------------------------------
# DICOMweb: QIDO and WADO (metadata, instance, frames, rendered) under the same gate
# ------------------------------------------------------------------------------------------------

BOUNDARY = "fedgateCONSENTboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


async def _stow_one_study_per_patient(gw: Gateway, http) -> dict[str, tuple[str, str, str]]:
    """STOW one single-slice study per patient (PatientID = the FHIR Patient's identifier value);
    patient id → (study, series, SOP instance UID)."""
    from tests.dicom_synth import ct_series, stow_body

    uids: dict[str, tuple[str, str, str]] = {}
    for pid in POPULATION:
        (ds,) = ct_series(patient_id=pid, patient_name=f"Test^{pid}", n=1, size=16)
        body = stow_body([ds], BOUNDARY)
        async with http.post(f"{gw.dicomweb}/studies", data=body,
                             headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
        uids[pid] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return uids


async def test_qido_and_wado_return_exactly_the_permitted_patients(site):
    from tests.dicom_synth import ct_series, stow_body

    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        uids = await _stow_one_study_per_patient(gw, http)
        for name, (purpose, attrs, permitted, rule) in PURPOSES.items():
            h = gw.headers("analyst", purpose=purpose, attrs=attrs)
            for level in ("studies", "series", "instances"):
                async with http.get(f"{gw.dicomweb}/{level}", params={"limit": "100"},
                                    headers=h | {"Accept": "application/dicom+json"}) as r:
                    assert r.status in (200, 204), await r.text()
                    found = await r.json() if r.status == 200 else []
                got = {item["00100020"]["Value"][0] for item in found}
                assert got == permitted, f"QIDO {level} {name}: {rule}"
                # the total counts exactly the permitted matches, also past the page (limit=1), with and
                # without a match on a parent level's attribute (counted over the joined levels)
                for params in ({"limit": "1"}, {"limit": "1", "StudyDescription": "*"} if level != "studies"
                               else {"limit": "1", "ModalitiesInStudy": "CT"}):
                    async with http.get(f"{gw.dicomweb}/{level}", params=params,
                                        headers=h | {"Accept": "application/dicom+json"}) as r:
                        assert r.status in (200, 204), await r.text()
                        assert int(r.headers["X-Total-Count"]) == len(permitted), (level, params, name)
            for pid, (st, se, sop) in uids.items():
                visible = int(pid in permitted)
                for url in (f"{gw.dicomweb}/studies/{st}/series", f"{gw.dicomweb}/studies/{st}/instances",
                            f"{gw.dicomweb}/studies/{st}/series/{se}/instances"):
                    async with http.get(url, params={"limit": "1"},
                                        headers=h | {"Accept": "application/dicom+json"}) as r:
                        assert r.status in (200, 204), await r.text()
                        assert int(r.headers["X-Total-Count"]) == visible, (url, name, pid)
                        assert len(await r.json() if r.status == 200 else []) == visible, (url, name, pid)
                inst = f"{gw.dicomweb}/studies/{st}/series/{se}/instances/{sop}"
                for url, accept in ((f"{gw.dicomweb}/studies/{st}/metadata", "application/dicom+json"),
                                    (inst, 'multipart/related; type="application/dicom"'),
                                    (f"{inst}/frames/1", 'multipart/related; type="application/octet-stream"'),
                                    (f"{inst}/rendered", "image/png")):
                    async with http.get(url, headers=h | {"Accept": accept}) as r:
                        await r.read()
                        if pid in permitted:
                            assert r.status == 200, (name, pid, url, r.status)
                        else:
                            assert r.status == 404, (name, pid, url, r.status)
        # treatment sees every study
        async with http.get(f"{gw.dicomweb}/studies", params={"limit": "100"},
                            headers=gw.headers("clinician") | {"Accept": "application/dicom+json"}) as r:
            assert {i["00100020"]["Value"][0] for i in await r.json()} == ALL

        # the profile stamped on the DICOM rows follows consent changes: withdrawal hides the patient's
        # studies/series/instances on the very next request, re-consent shows them again
        gru = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        st, se, sop = uids["p-gru"]

        async def dicom_visible() -> dict[str, set]:
            out = {}
            for level in ("studies", "series", "instances"):
                async with http.get(f"{gw.dicomweb}/{level}", params={"limit": "100"},
                                    headers=gru | {"Accept": "application/dicom+json"}) as r:
                    found = await r.json() if r.status == 200 else []
                out[level] = {item["00100020"]["Value"][0] for item in found}
            async with http.get(f"{gw.dicomweb}/studies/{st}/series/{se}/instances/{sop}/metadata",
                                headers=gru | {"Accept": "application/dicom+json"}) as r:
                await r.read()
                out["wado"] = {"p-gru"} if r.status == 200 else set()
            return out

        assert await dicom_visible() == dict.fromkeys(("studies", "series", "instances", "wado"), {"p-gru"})
        ehr = gw.headers("ehr-system") | FHIR_JSON
        withdrawn = consent("p-gru", ["DUO:0000042"], [], {"status": "inactive"})
        async with http.put(f"{gw.fhir}/Consent/c-p-gru", json=withdrawn, headers=ehr) as r:
            assert r.status == 200, await r.text()
        assert await dicom_visible() == dict.fromkeys(("studies", "series", "instances", "wado"), set())
        # a study arriving while the consent is withdrawn is stamped with the current (no) profile
        (late,) = ct_series(patient_id="p-gru", patient_name="Test^p-gru", n=1, size=16)
        body = stow_body([late], BOUNDARY)
        async with http.post(f"{gw.dicomweb}/studies", data=body,
                             headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
        assert await dicom_visible() == dict.fromkeys(("studies", "series", "instances", "wado"), set())
        again = consent("p-gru", ["DUO:0000042"], [], {}) | {"id": "c-p-gru-2"}
        async with http.put(f"{gw.fhir}/Consent/c-p-gru-2", json=again, headers=ehr) as r:
            assert r.status == 201, await r.text()
        assert await dicom_visible() == dict.fromkeys(("studies", "series", "instances", "wado"), {"p-gru"})
        async with http.get(f"{gw.dicomweb}/studies", params={"limit": "100", "PatientID": "p-gru"},
                            headers=gru | {"Accept": "application/dicom+json"}) as r:
            assert {i["0020000D"]["Value"][0] for i in await r.json()} == {st, late.StudyInstanceUID}


async def test_store_without_stamped_numbers_is_back_filled_at_start_up(site):
    """A store from before ``consent_no`` existed: start-up adds the column (to the stamped tables and the
    search-index tables, with the gate indexes) and back-fills it from cm_patient, and every route then
    returns exactly the permitted patients again."""
    from sqlalchemy import text

    from gateway.store.consent_schema import ensure_indexes, index_tables, stamped_tables
    from gateway.store.schema import GATE_INDEXES

    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        await _stow_one_study_per_patient(gw, http)
        async with gw.app[keys.DB].write() as conn:
            for table in stamped_tables():
                await conn.execute(text(f"DROP INDEX IF EXISTS ix_{table.name}_consent_no"))
                await conn.execute(text(f"ALTER TABLE {table.name} DROP COLUMN consent_no"))
            for ix in GATE_INDEXES:  # and from before the search-index tables carried it
                await conn.execute(text(f"DROP INDEX IF EXISTS {ix.name}"))
            for table in index_tables():
                await conn.execute(text(f"ALTER TABLE {table.name} DROP COLUMN consent_no"))
        async with gw.app[keys.DB].write() as conn:
            await ensure_indexes(conn)  # what start-up runs (consent_ctx)
        for name in ("biomedical+irb", "melanoma+noncommercial"):
            purpose, attrs, permitted, rule = PURPOSES[name]
            h = gw.headers("analyst", purpose=purpose, attrs=attrs)
            assert await _visible_everywhere(gw, http, h) == _expect(permitted), f"{name}: {rule}"
            for level in ("studies", "series", "instances"):
                async with http.get(f"{gw.dicomweb}/{level}", params={"limit": "100"},
                                    headers=h | {"Accept": "application/dicom+json"}) as r:
                    found = await r.json() if r.status == 200 else []
                assert {i["00100020"]["Value"][0] for i in found} == permitted, f"QIDO {level} {name}"


async def test_a_resource_moved_to_another_patient_follows_that_patients_consent(site):
    """An update that changes a resource's patient (subject) restamps all its search-index rows, also the
    ones whose values did not change (the gate is tested on the index rows of index-driven searches)."""
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        gru = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        ehr = gw.headers("ehr-system") | FHIR_JSON

        async def visible_ids() -> dict[str, set]:
            out = {}
            for label, params in (("token", {"code": "http://loinc.org|8867-4"}),
                                  ("quantity", {"value-quantity": "ge0"}), ("no index", {})):
                b = await _bundle(http, f"{gw.fhir}/Observation", gru, _count="100", **params)
                out[label] = {r["id"] for r in _resources(b)}
            return out

        before = await visible_ids()
        assert all(ids == {"o-p-gru-1", "o-p-gru-2"} for ids in before.values()), before
        # o-p-gru-1 moves to a patient without consent; o-p-none-1 moves to the GRU patient (same code/value)
        for oid, src, dst in (("o-p-gru-1", "p-gru", "p-none"), ("o-p-none-1", "p-none", "p-gru")):
            moved = observation(src, 1) | {"subject": {"reference": f"Patient/{dst}"}}
            async with http.put(f"{gw.fhir}/Observation/{oid}", json=moved, headers=ehr) as r:
                assert r.status == 200, await r.text()
        after = await visible_ids()
        assert all(ids == {"o-p-gru-2", "o-p-none-1"} for ids in after.values()), after
