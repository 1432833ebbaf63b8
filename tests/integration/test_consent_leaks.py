"""Issue #19 leaks 1, 2, 3, 6 and 7: paths around the consent gate, closed by the access layer.

A small population: ``p-ok`` (GRU consent: permitted for a GRU research purpose) and ``p-no`` (no consent:
refused).  Each test drives a path that, before the access layer, returned ``p-no``'s data (or told that it
existed) to a research requester while a direct read of ``Patient/p-no`` answered 404 — and checks that
a treatment requester still sees everything (so the assertions can fail the other way too).
"""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from tests.conftest import Gateway
from tests.integration.test_consent_enforcement import FHIR_JSON, consent, patient, site  # (fixture)

GRU = {"codes": ["DUO:0000042"]}
IDENT = "urn:fedgate:test"


def research(gw: Gateway, role: str = "analyst") -> dict:
    return gw.headers(role, purpose=GRU)


async def _put(http, gw: Gateway, res: dict, status=(200, 201)) -> dict:
    async with http.put(f"{gw.fhir}/{res['resourceType']}/{res['id']}", json=res,
                        headers=gw.headers("ehr-system") | FHIR_JSON) as r:
        assert r.status in status, await r.text()
        return await r.json()


async def _load(gw: Gateway, http) -> None:
    for pid in ("p-ok", "p-no"):
        await _put(http, gw, patient(pid))
    await _put(http, gw, consent("p-ok", ["DUO:0000042"], [], {}))


async def _status(http, url: str, headers: dict, **params) -> tuple[int, str]:
    async with http.get(url, headers=headers, params=params) as r:
        return r.status, await r.text()


async def _total(http, url: str, headers: dict, **params) -> int:
    async with http.get(url, headers=headers, params={**params, "_total": "accurate"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["total"]


def obs(oid: str, pid: str, **extra) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 61, "unit": "/min"}, **extra}


def _ref(pid: str) -> dict:
    return {"reference": f"Patient/{pid}"}


def linked_resources(pid: str, tag: str) -> list[dict]:
    """One resource per reference path of issue #19 leak 3, each linked to ``pid`` only through that path."""
    r = _ref(pid)
    return [
        {"resourceType": "Task", "id": f"task-{tag}", "status": "draft", "intent": "order", "for": r},
        {"resourceType": "Account", "id": f"acct-{tag}", "status": "active", "subject": [r]},
        {"resourceType": "Appointment", "id": f"appt-{tag}", "status": "booked",
         "participant": [{"actor": r, "status": "accepted"}]},
        {"resourceType": "AppointmentResponse", "id": f"apptr-{tag}", "appointment": {"reference": "Appointment/x"},
         "actor": r, "participantStatus": "accepted"},
        {"resourceType": "Schedule", "id": f"sched-{tag}", "actor": [r]},
        {"resourceType": "Group", "id": f"grp-{tag}", "type": "person", "actual": True, "member": [{"entity": r}]},
        {"resourceType": "Provenance", "id": f"prov-{tag}", "target": [r], "recorded": "2024-01-01T00:00:00Z",
         "agent": [{"who": {"reference": "Organization/org-1"}}]},
        {"resourceType": "ResearchSubject", "id": f"rs-{tag}", "status": "on-study",
         "study": {"reference": "ResearchStudy/s1"}, "individual": r},
        {"resourceType": "Communication", "id": f"comm-{tag}", "status": "completed", "recipient": [r]},
        {"resourceType": "Person", "id": f"person-{tag}", "link": [{"target": r}]},
        {"resourceType": "Observation", "id": f"focus-{tag}", "status": "final",
         "code": {"text": "focus"}, "focus": [r]},
        # a reference by type + identifier only
        {"resourceType": "Observation", "id": f"ident-{tag}", "status": "final", "code": {"text": "identifier"},
         "subject": {"type": "Patient", "identifier": {"system": IDENT, "value": pid}}},
        # a contained Patient (its identifier is the patient's)
        {"resourceType": "Observation", "id": f"contained-{tag}", "status": "final", "code": {"text": "contained"},
         "contained": [{"resourceType": "Patient", "id": "pt", "identifier": [{"system": IDENT, "value": pid}],
                        "name": [{"family": f"Fam-{pid}"}]}],
         "subject": {"reference": "#pt"}},
        # a reference inside an extension
        {"resourceType": "Basic", "id": f"ext-{tag}", "code": {"text": "ext"},
         "extension": [{"url": "https://example.org/x", "valueReference": r}]},
    ]


async def test_leak3_every_reference_path(site, db_url):
    """Leak 3: a resource linked to a refused patient through any reference is hidden from research."""
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        for res in linked_resources("p-no", "no") + linked_resources("p-ok", "ok"):
            await _put(http, gw, res)
        # several patients: visible only when every one is permitted
        await _put(http, gw, obs("both", "p-ok", performer=[_ref("p-no")]))
        await _put(http, gw, obs("both-ok", "p-ok", performer=[_ref("p-ok")]))
        # an identifier that names no patient of this site, and a contained Patient without identifier
        await _put(http, gw, {"resourceType": "Observation", "id": "ident-unknown", "status": "final",
                              "code": {"text": "x"}, "subject": {"type": "Patient",
                                                                 "identifier": {"system": IDENT, "value": "nobody"}}})
        hr, ht = research(gw), gw.headers("clinician")
        assert (await _status(http, f"{gw.fhir}/Patient/p-no", hr))[0] == 404
        for res in linked_resources("p-no", "no"):
            url = f"{gw.fhir}/{res['resourceType']}/{res['id']}"
            assert (await _status(http, url, ht))[0] == 200, res["id"]
            status, body = await _status(http, url, hr)
            assert status == 404, (res["id"], body)
            assert await _total(http, f"{gw.fhir}/{res['resourceType']}", hr, _id=res["id"]) == 0, res["id"]
            assert await _total(http, f"{gw.fhir}/{res['resourceType']}", ht, _id=res["id"]) == 1, res["id"]
            status, _ = await _status(http, f"{url}/_history/1", hr)
            assert status == 404, res["id"]
        for res in linked_resources("p-ok", "ok"):
            url = f"{gw.fhir}/{res['resourceType']}/{res['id']}"
            assert (await _status(http, url, hr))[0] == 200, res["id"]
        assert (await _status(http, f"{gw.fhir}/Observation/both", hr))[0] == 404
        assert (await _status(http, f"{gw.fhir}/Observation/both-ok", hr))[0] == 200
        assert (await _status(http, f"{gw.fhir}/Observation/ident-unknown", hr))[0] == 404
        assert (await _status(http, f"{gw.fhir}/Observation/ident-unknown", ht))[0] == 200
        # nothing of p-no in any search or history answer
        for url in (f"{gw.fhir}/Observation", f"{gw.fhir}/_history", f"{gw.fhir}/Observation/_history"):
            status, body = await _status(http, url, hr, _count="500")
            assert status == 200 and "p-no" not in body, url
        # withdrawing p-ok's consent hides the resources linked to p-ok (several patients included)
        await _put(http, gw, consent("p-ok", ["DUO:0000042"], [], {"status": "inactive"}))
        assert (await _status(http, f"{gw.fhir}/Task/task-ok", hr))[0] == 404
        assert (await _status(http, f"{gw.fhir}/Observation/both-ok", hr))[0] == 404
        await _put(http, gw, consent("p-ok", ["DUO:0000042"], [], {}))
        assert (await _status(http, f"{gw.fhir}/Observation/both-ok", hr))[0] == 200
        # giving p-no a consent makes the two-patient resource visible (its combined profile is permitted)
        await _put(http, gw, consent("p-no", ["DUO:0000042"], [], {}))
        assert (await _status(http, f"{gw.fhir}/Observation/both", hr))[0] == 200
        assert (await _status(http, f"{gw.fhir}/Task/task-no", hr))[0] == 200


async def test_leak2_old_versions_and_leak7_deleted(site, db_url):
    """Leak 2: old versions after delete / after moving subject; batch GET _history/N.  Leak 7: deleted
    answers like never-existing for research (404, no version), 410 for treatment."""
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        await _put(http, gw, obs("o-del", "p-no"))
        await _put(http, gw, obs("o-move", "p-no"))
        await _put(http, gw, obs("o-move", "p-ok"))  # v2: moved to the permitted patient
        await _put(http, gw, obs("o-okdel", "p-ok"))
        for oid in ("o-del", "o-okdel"):
            async with http.delete(f"{gw.fhir}/Observation/{oid}", headers=gw.headers("ehr-system")) as r:
                assert r.status in (200, 204)
        hr, ht = research(gw), gw.headers("clinician")
        f = gw.fhir
        # deleted: 404 for research, at every version and in history; 410 for treatment
        for oid in ("o-del", "o-okdel"):
            status, body = await _status(http, f"{f}/Observation/{oid}", hr)
            assert status == 404 and "ETag" not in body, body
            assert (await _status(http, f"{f}/Observation/{oid}/_history/1", hr))[0] == 404
            assert (await _status(http, f"{f}/Observation/{oid}/_history/2", hr))[0] == 404
            assert (await _status(http, f"{f}/Observation/{oid}/_history", hr))[0] == 404
            assert (await _status(http, f"{f}/Observation/{oid}", ht))[0] == 410
            assert (await _status(http, f"{f}/Observation/{oid}/_history/1", ht))[0] == 200
        never = await _status(http, f"{f}/Observation/never-existed", hr)
        gone = await _status(http, f"{f}/Observation/o-okdel", hr)
        assert never[0] == gone[0] == 404
        # moved: the current version is visible, the old one (refused patient) is not
        assert (await _status(http, f"{f}/Observation/o-move", hr))[0] == 200
        assert (await _status(http, f"{f}/Observation/o-move/_history/2", hr))[0] == 200
        status, body = await _status(http, f"{f}/Observation/o-move/_history/1", hr)
        assert status == 404 and "p-no" not in body
        assert (await _status(http, f"{f}/Observation/o-move/_history/1", ht))[0] == 200
        status, body = await _status(http, f"{f}/Observation/o-move/_history", hr)
        assert status == 200 and "p-no" not in body and '"versionId":"2"' in body.replace(" ", "")
        for url in (f"{f}/_history", f"{f}/Observation/_history"):
            status, body = await _status(http, url, hr, _count="500")
            assert status == 200 and "p-no" not in body and "o-del" not in body and "o-okdel" not in body
        # batch GET of old versions: the same answers as the direct reads
        batch = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": u}} for u in (
                "Observation/o-del/_history/1", "Observation/o-move/_history/1", "Observation/o-okdel/_history/1",
                "Observation/o-move/_history/2")]}
        async with http.post(f, json=batch, headers=hr | FHIR_JSON) as r:
            assert r.status == 200
            out = await r.json()
        statuses = [e["response"]["status"].split()[0] for e in out["entry"]]
        assert statuses == ["404", "404", "404", "200"], statuses
        assert "p-no" not in str(out)


async def test_leak6_site_admin_research_transaction(site, db_url):
    """Leak 6: site/admin tokens with a research purpose: a transaction GET entry and POST with
    If-None-Exist give nothing a direct read refuses."""
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        for role in ("site", "admin"):
            h = research(gw, role) | FHIR_JSON
            assert (await _status(http, f"{gw.fhir}/Patient/p-no", h))[0] == 404
            tx = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"request": {"method": "GET", "url": "Patient/p-no"}}]}
            async with http.post(gw.fhir, json=tx, headers=h) as r:
                body = await r.text()
                assert r.status == 404 and "Fam-p-no" not in body, (role, r.status, body)
            tx["entry"] = [{"request": {"method": "GET", "url": "Patient?_id=p-no"}}]
            async with http.post(gw.fhir, json=tx, headers=h) as r:
                body = await r.text()
                assert "Fam-p-no" not in body, body
            tx["entry"] = [{"request": {"method": "GET", "url": "Patient/p-ok"}}]
            async with http.post(gw.fhir, json=tx, headers=h) as r:
                assert r.status == 200 and "Fam-p-ok" in await r.text()
            new = {"resourceType": "Patient", "name": [{"family": "Dup"}]}
            async with http.post(f"{gw.fhir}/Patient", json=new, headers=h | {"If-None-Exist": "_id=p-no"}) as r:
                body = await r.text()
                assert r.status == 403 and "Fam-p-no" not in body, (role, r.status, body)
            tx["entry"] = [{"request": {"method": "POST", "url": "Patient", "ifNoneExist": "_id=p-no"},
                            "resource": new, "fullUrl": f"urn:uuid:{uuid.uuid4()}"}]
            async with http.post(gw.fhir, json=tx, headers=h) as r:
                body = await r.text()
                assert r.status == 403 and "Fam-p-no" not in body, (role, r.status, body)
        # treatment: the same requests still work
        h = gw.headers("site", purpose="treatment") | FHIR_JSON
        async with http.post(gw.fhir, json={"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "GET", "url": "Patient/p-no"}}]}, headers=h) as r:
            body = await r.text()
            assert r.status == 200 and "Fam-p-no" in body, body
        async with http.post(f"{gw.fhir}/Patient", json={"resourceType": "Patient"},
                             headers=h | {"If-None-Exist": "_id=p-no"}) as r:
            assert r.status == 200 and "Fam-p-no" in await r.text()


async def test_leak1_dicom_only_patient_imagingstudy(site, db_url):
    """Leak 1: the ImagingStudy of a DICOM-only (unconsented) patient is hidden from FHIR research reads."""
    from tests.dicom_synth import ct_series, stow_body

    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        ds = ct_series(patient_id="DICOM-ONLY-1", patient_name="Only^Dicom", n=1, accession="ACC-LEAK1")
        study = ds[0].StudyInstanceUID
        boundary = "leak1boundary"
        async with http.post(f"{gw.dicomweb}/studies", data=stow_body(ds, boundary),
                             headers=gw.headers("pacs") | {
                                 "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                 "Accept": "application/dicom+json"}) as r:
            assert r.status == 200, await r.text()
        hr, ht = research(gw), gw.headers("clinician")
        assert await _total(http, f"{gw.fhir}/ImagingStudy", ht) == 1
        assert (await _status(http, f"{gw.fhir}/ImagingStudy/{study}", ht))[0] == 200
        assert await _total(http, f"{gw.fhir}/ImagingStudy", hr) == 0
        for url in (f"{gw.fhir}/ImagingStudy/{study}", f"{gw.fhir}/ImagingStudy/{study}/_history",
                    f"{gw.fhir}/ImagingStudy/{study}/_history/1"):
            status, body = await _status(http, url, hr)
            assert status == 404 and "ACC-LEAK1" not in body, (url, body)
        for url in (f"{gw.fhir}/ImagingStudy/_history", f"{gw.fhir}/_history"):
            status, body = await _status(http, url, hr)
            assert status == 200 and "ACC-LEAK1" not in body and study not in body, url
        # a DICOM-only patient whom the site policy permits (its collection: issuer urn:fedgate:retro-cohort):
        # its ImagingStudy is visible to a purpose the policy permits, and still not to GRU
        ds2 = ct_series(patient_id="DICOM-RETRO-1", patient_name="Retro^Dicom", n=1, accession="ACC-RETRO",
                        issuer="urn:fedgate:retro-cohort")
        async with http.post(f"{gw.dicomweb}/studies", data=stow_body(ds2, boundary),
                             headers=gw.headers("pacs") | {
                                 "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                 "Accept": "application/dicom+json"}) as r:
            assert r.status == 200, await r.text()
        hmb = gw.headers("analyst", purpose={"codes": ["DUO:0000037"]}, attrs={"irb_approved": True})
        url2 = f"{gw.fhir}/ImagingStudy/{ds2[0].StudyInstanceUID}"
        assert (await _status(http, url2, hmb))[0] == 200
        assert (await _status(http, url2, hr))[0] == 404
        assert (await _status(http, f"{gw.fhir}/ImagingStudy/{study}", hmb))[0] == 404


async def test_backfill_links_of_a_store_written_before_them(site, db_url):
    """A store written before patient links (rows stamped from subject/patient/beneficiary only, no
    ``fhir_link``) is back-filled on start-up (``consent_schema.ensure_indexes``): the leak closes."""
    from sqlalchemy import delete, update

    from gateway import keys
    from gateway.store import schema as s
    from gateway.store.consent_schema import ensure_indexes

    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        await _put(http, gw, linked_resources("p-no", "no")[0])  # Task.for p-no
        await _put(http, gw, obs("both", "p-ok", performer=[_ref("p-no")]))
        hr = research(gw)
        db = gw.app[keys.DB]
        R = s.fhir_resource
        async with db.write() as conn:  # what the code before issue #19 left behind
            await conn.execute(delete(s.fhir_link))
            await conn.execute(delete(s.schema_version).where(s.schema_version.c.component == "fhir_link"))
            await conn.execute(update(R).where(R.c.res_id == "task-no").values(patient_id=None, consent_no=0,
                                                                               multi_link=None))
            await conn.execute(update(R).where(R.c.res_id == "both").values(multi_link=None))
            ok_no = (await conn.execute(R.select().where(R.c.res_id == "p-ok"))).first().consent_no
            await conn.execute(update(R).where(R.c.res_id == "both").values(consent_no=ok_no))
            for table in s.INDEX_TABLES.values():
                await conn.execute(update(table).where(table.c.res_type.in_(["Task", "Observation"])).values(
                    consent_no=None))
                await conn.execute(update(table).where(table.c.res_type == "Task").values(consent_no=0))
        assert (await _status(http, f"{gw.fhir}/Task/task-no", hr))[0] == 200  # the old leak
        assert (await _status(http, f"{gw.fhir}/Observation/both", hr))[0] == 200
        async with db.write() as conn:
            await ensure_indexes(conn)
        assert (await _status(http, f"{gw.fhir}/Task/task-no", hr))[0] == 404
        assert (await _status(http, f"{gw.fhir}/Observation/both", hr))[0] == 404
        assert await _total(http, f"{gw.fhir}/Task", hr, _id="task-no") == 0
        status, body = await _status(http, f"{gw.fhir}/Observation", hr, code="http://loinc.org|8867-4")
        assert status == 200 and '"both"' not in body  # the search index's stamps too
        assert (await _status(http, f"{gw.fhir}/Task/task-no/_history/1", hr))[0] == 404
        assert (await _status(http, f"{gw.fhir}/Patient/p-ok", hr))[0] == 200
