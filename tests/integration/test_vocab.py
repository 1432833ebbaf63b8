"""The vocabulary store end to end (issue 23), on both engines: `fedgate vocab load` (CLI), versioned
switch and prune, cohort `descendants` on a served site's store, FHIR `:below`/`:above`, the terminology
operations, and DUO disease-specific consent matched through the loaded MONDO subset."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from gateway.cli import main as cli_main
from gateway.services.federation_synth import DEMO_SITES, generate, load
from gateway.services.vocab import load_path
from gateway.store import open_database
from gateway.store.vocab_schema import list_releases
from gateway.store.cohort import compile_cohort
from gateway.store.scope import UNRESTRICTED
from mappings.cohort.language import parse
from tests.conftest import make_settings, start_gateway
from tests.integration.federation_ref import Oracle
from tests.vocab_ref import SCT, VOCAB, expand_codes, snomed_children, snomed_descendants

FHIR_JSON = {"Content-Type": "application/fhir+json"}
MONDO_SYS = "http://purl.obolibrary.org/obo/mondo.owl"


def _cli(*args: str) -> int:
    return cli_main(list(args))


async def test_cli_load_versions_switch_and_prune(tmp_path, db_url, capsys):
    base = ["--data-dir", str(tmp_path / "d"), "--database-url", db_url]
    assert await asyncio.to_thread(_cli, "vocab", "load", "--demo", "--quiet", *base) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in loaded} == {"snomed-athena", "mondo", "doid", "hp"}
    assert next(r for r in loaded if r["name"] == "snomed-athena")["closure_rows"] == sum(
        len(v) for v in snomed_descendants().values())
    # a new MONDO release: the old one keeps serving until the switch, then is retired and pruned
    new = tmp_path / "mondo-next.obo"
    new.write_text((VOCAB / "mondo-subset.obo").read_text().replace(
        "data-version: fedgate-subset-of-mondo-2024", "data-version: next")
        + "\n[Term]\nid: MONDO:0000002\nname: new child of melanoma\nis_a: MONDO:0005105\n")
    settings = make_settings(tmp_path / "d", db_url)
    db = await open_database(settings)
    try:
        from sqlalchemy import select

        from gateway.store.vocab_schema import descendants_select

        async def below_cancer():
            async with db.read() as conn:
                return {r[0] for r in (await conn.execute(descendants_select(MONDO_SYS, "MONDO:0004992"))).all()}

        before = await below_cancer()
        assert "MONDO:0005105" in before and "MONDO:0000002" not in before
        summary = await load_path(db, new)
        assert summary["replaced"] and summary["release"] == "next"
        assert "MONDO:0000002" in await below_cancer()
        async with db.read() as conn:
            states = {(r["name"], r["release"]): r["state"] for r in await list_releases(conn)}
        assert states[("mondo", "fedgate-subset-of-mondo-2024")] == "retired"
        assert states[("mondo", "next")] == "active"
    finally:
        await db.dispose()
    assert await asyncio.to_thread(_cli, "vocab", "prune", *base) == 0
    assert json.loads(capsys.readouterr().out)["pruned"] == summary["replaced"]
    assert await asyncio.to_thread(_cli, "vocab", "list", *base) == 0
    assert {r["state"] for r in json.loads(capsys.readouterr().out)} == {"active"}
    # bad input: a clear message, exit 2, nothing switched
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "ValueSet"}')
    assert await asyncio.to_thread(_cli, "vocab", "load", str(bad), *base) == 2
    assert "not a FHIR CodeSystem" in capsys.readouterr().err


async def test_descendants_on_served_store_equal_union_of_children(tmp_path, db_url):
    """Issue 23 'done when': descendants of a SNOMED parent == the union of its children (and theirs),
    computed from the subset's CSV files; the SQL reads the loaded closure (no expander)."""
    settings = make_settings(tmp_path / "d", db_url)
    db = await open_database(settings)
    rows = generate(DEMO_SITES[0], 400, seed=3)
    try:
        await load(db, rows)
        from gateway.vocab_cli import load_demo

        await load_demo(db)
        children = snomed_children()
        oracle = Oracle(rows, expand_codes)
        for parent in ("73211009", "362969004", "64572001", "49601007"):
            doc = {"condition": {"code": f"{SCT}|{parent}", "descendants": True}}
            async with db.read() as conn:
                got = {r[0] for r in (await conn.execute(compile_cohort(parse(doc), UNRESTRICTED))).all()}
            union: set[str] = set()
            for child in children.get(parent, ()):
                union |= oracle.cohort({"condition": {"code": f"{SCT}|{child}", "descendants": True}})
            union |= oracle.cohort({"condition": {"code": f"{SCT}|{parent}"}})
            assert got == union, parent
        assert got  # the generated sites do have diabetes / heart failure / hypertension
        # without descendants: only the code itself (no synthetic row carries the parent code)
        async with db.read() as conn:
            plain = (await conn.execute(compile_cohort(parse({"condition": {"code": f"{SCT}|73211009"}}), UNRESTRICTED))).all()
        assert plain == []
    finally:
        await db.dispose()


@pytest.fixture
async def vgw(tmp_path, db_url):
    settings = make_settings(tmp_path / "data", db_url, extra={"vocab": {"load": ["demo"]}, "consent": {"refresh_s": 0}})
    gw = await start_gateway(settings)
    try:
        yield gw
    finally:
        await gw.server.close()


async def test_terminology_operations(vgw):
    h = vgw.headers("analyst")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{vgw.fhir}/CodeSystem/$lookup", params={"system": SCT, "code": "73211009"}, headers=h) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        params = {p["name"]: p.get("valueString") for p in body["parameter"] if "valueString" in p}
        assert params["display"] == "Diabetes mellitus"
        kids = {p["part"][1]["valueCode"] for p in body["parameter"]
                if p["name"] == "property" and p["part"][0]["valueCode"] == "child"}
        assert kids == snomed_children()["73211009"]
        for a, b, outcome in (("73211009", "46635009", "subsumes"), ("46635009", "73211009", "subsumed-by"),
                              ("46635009", "44054006", "not-subsumed"), ("84114007", "84114007", "equivalent")):
            async with http.get(f"{vgw.fhir}/CodeSystem/$subsumes",
                                params={"system": SCT, "codeA": a, "codeB": b}, headers=h) as r:
                assert (await r.json())["parameter"][0]["valueCode"] == outcome
        post = {"resourceType": "Parameters", "parameter": [
            {"name": "system", "valueUri": MONDO_SYS}, {"name": "codeA", "valueCode": "MONDO:0004992"},
            {"name": "codeB", "valueCode": "MONDO:0005105"}]}
        async with http.post(f"{vgw.fhir}/CodeSystem/$subsumes", json=post, headers=h | FHIR_JSON) as r:
            assert (await r.json())["parameter"][0]["valueCode"] == "subsumes"
        async with http.get(f"{vgw.fhir}/ValueSet/$expand", params={"url": f"{SCT}?fhir_vs=isa/49601007"},
                            headers=h) as r:
            exp = (await r.json())["expansion"]
        assert {c["code"] for c in exp["contains"]} == {"49601007"} | snomed_descendants()["49601007"]
        assert exp["total"] == len(exp["contains"])
        async with http.get(f"{vgw.fhir}/ValueSet/$expand", params={"url": SCT, "count": "2", "offset": "1"},
                            headers=h) as r:
            exp = (await r.json())["expansion"]
        assert exp["total"] == 12 and len(exp["contains"]) == 2
        # errors: OperationOutcome with the right status
        for path, params, status in (("CodeSystem/$lookup", {"system": SCT, "code": "nope"}, 404),
                                     ("CodeSystem/$lookup", {"system": SCT}, 400),
                                     ("CodeSystem/$subsumes", {"system": "urn:x", "codeA": "a", "codeB": "b"}, 404),
                                     ("ValueSet/$expand", {"url": "urn:not-loaded"}, 404),
                                     ("ValueSet/$expand", {"url": f"{SCT}?filter=x"}, 400),
                                     ("ValueSet/$expand", {"url": SCT, "count": "-1"}, 400)):
            async with http.get(f"{vgw.fhir}/{path}", params=params, headers=h) as r:
                assert r.status == status, (path, params, await r.text())
                assert (await r.json())["resourceType"] == "OperationOutcome"
        async with http.post(f"{vgw.fhir}/CodeSystem/$lookup", json={"resourceType": "Patient"}, headers=h | FHIR_JSON) as r:
            assert r.status == 400
        async with http.get(f"{vgw.fhir}/CodeSystem/$lookup", params={"system": SCT, "code": "73211009"}) as r:
            assert r.status == 401
        async with http.get(f"{vgw.fhir}/metadata") as r:
            res = {x["type"]: x for x in (await r.json())["rest"][0]["resource"]}
        assert {o["name"] for o in res["CodeSystem"]["operation"]} == {"lookup", "subsumes"}
        assert [o["name"] for o in res["ValueSet"]["operation"]] == ["expand"]


def _condition(cid: str, pid: str, code: str) -> dict:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": SCT, "code": code}]}}


async def test_fhir_token_below_and_above(vgw):
    h = vgw.headers("clinician") | FHIR_JSON
    entries = [{"resource": {"resourceType": "Patient", "id": "pv1"}, "request": {"method": "PUT", "url": "Patient/pv1"}}]
    codes = {"c1": "46635009", "c2": "44054006", "c3": "84114007", "c4": "73211009", "c5": "404684003"}
    for cid, code in codes.items():
        entries.append({"resource": _condition(cid, "pv1", code), "request": {"method": "PUT", "url": f"Condition/{cid}"}})
    async with aiohttp.ClientSession() as http:
        async with http.post(vgw.fhir, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                             headers=vgw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 200, await r.text()

        async def ids(query: str) -> set[str]:
            async with http.get(f"{vgw.fhir}/Condition?{query}", headers=h) as r:
                assert r.status == 200, await r.text()
                return {e["resource"]["id"] for e in (await r.json()).get("entry", [])}

        below = snomed_descendants()["73211009"] | {"73211009"}
        assert await ids(f"code:below={SCT}|73211009") == {c for c, k in codes.items() if k in below}
        above = {a for a, ds in snomed_descendants().items() if "46635009" in ds} | {"46635009"}
        assert await ids(f"code:above={SCT}|46635009") == {c for c, k in codes.items() if k in above}
        assert await ids(f"code={SCT}|73211009") == {"c4"}
        assert await ids("code:below=73211009") == {"c1", "c2", "c4"}  # any loaded system
        async with http.get(f"{vgw.fhir}/Condition?code:below=urn:unknown|x", headers=h) as r:
            assert r.status == 200 and not (await r.json()).get("entry")


async def test_ds_consent_through_gate_with_loaded_mondo(vgw):
    """A DS consent on MONDO:0004992 (cancer) permits a request on melanoma (a descendant in the loaded
    subset) and refuses cardiovascular disease (not under cancer) and an unknown code (fail closed)."""
    duo = "http://purl.obolibrary.org/obo/duo"
    consent = {"resourceType": "Consent", "id": "c-ds", "status": "active",
               "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
               "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
               "patient": {"reference": "Patient/p-ds"},
               "policyRule": {"coding": [{"system": duo, "code": "DUO:0000007"}]},
               "provision": {"type": "permit", "purpose": [{"system": duo, "code": "DUO:0000007"}],
                             "code": [{"coding": [{"system": "http://purl.obolibrary.org/obo/mondo", "code": "MONDO:0004992"}]}]}}
    obs = {"resourceType": "Observation", "id": "o-ds", "status": "final", "subject": {"reference": "Patient/p-ds"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
               for r in ({"resourceType": "Patient", "id": "p-ds"}, obs, consent)]
    async with aiohttp.ClientSession() as http:
        async with http.post(vgw.fhir, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                             headers=vgw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 200, await r.text()
        for disease, visible in (("MONDO:0005105", True), ("MONDO:0004992", True), ("MONDO:0004995", False),
                                 ("MONDO:0000001", False), ("MONDO:9999999", False)):
            h = vgw.headers("analyst", purpose={"codes": ["DUO:0000040"], "diseases": [disease]})
            async with http.get(f"{vgw.fhir}/Observation", headers=h) as r:
                assert r.status == 200, await r.text()
                got = {e["resource"]["id"] for e in (await r.json()).get("entry", [])}
            assert got == ({"o-ds"} if visible else set()), disease


def test_consent_evaluate_cli_with_shipped_mondo(capsys, monkeypatch):
    import io

    doc = {"consent": {"permission": "DUO:0000007", "diseases": ["MONDO:0004992"]},
           "purpose": {"codes": ["DUO:0000040"], "diseases": ["MONDO:0005105"]}, "requester": {}}
    results = {}
    for disease in ("MONDO:0005105", "MONDO:0004995"):
        doc["purpose"]["diseases"] = [disease]
        monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(doc)))
        cli_main(["consent", "evaluate", "--disease-ontology", str(VOCAB / "mondo-subset.obo")])
        results[disease] = json.loads(capsys.readouterr().out)
    assert results["MONDO:0005105"]["decision"] == "permit", results
    assert results["MONDO:0004995"]["decision"] != "permit", results
