"""Issue 19: every refused request (400/401/403/404/410, and a route that does not exist) leaves exactly
one AuditEvent — outcome 4, typed codes, the route template, the resources and patients the request named —
and none carries the request's query values."""

from __future__ import annotations

import aiohttp
import orjson
import sqlalchemy as sa

from gateway.services.audit_codes import Action, Interaction, Outcome
from gateway.store.audit_schema import audit_event
from gateway.store.db import Database

FHIR_JSON = {"Content-Type": "application/fhir+json"}
PLANTED = "Xylophonia"  # a value of the requests' queries that must never reach the trail


async def _events(settings) -> list[dict]:
    db = Database(settings.effective_database_url)
    try:
        async with db.read() as conn:
            rows = (await conn.execute(sa.select(audit_event.c.content).order_by(audit_event.c.seq))).scalars().all()
    finally:
        await db.dispose()
    return [orjson.loads(r) for r in rows]


def _patients(ev: dict) -> set[str]:
    return {e["what"]["reference"].removeprefix("Patient/") for e in ev.get("entity", ())
            if e.get("type", {}).get("code") == "1"}


def _refs(ev: dict) -> set[str]:
    return {e["what"]["reference"] for e in ev.get("entity", ()) if "type" not in e}


async def test_every_refused_request_is_audited_once_with_its_patients(gateway):
    gw = gateway
    admin = gw.headers("admin")
    analyst = gw.headers("analyst", subject="ana", purpose={"codes": ["DUO:0000042"]})
    async with aiohttp.ClientSession() as http:
        for pid in ("pa", "pdel"):
            async with http.put(f"{gw.fhir}/Patient/{pid}", json={"resourceType": "Patient", "id": pid},
                                headers=admin | FHIR_JSON) as r:
                assert r.status == 201
        async with http.delete(f"{gw.fhir}/Patient/pdel", headers=admin) as r:
            assert r.status in (200, 204)
        before = len(await _flush_and_events(gw))

        # (method, url, headers, body, status, interaction, action, patients, resources, agent)
        cases = [
            ("GET", f"{gw.fhir}/Patient/pa", {}, None, 401, Interaction.READ, Action.READ, {"pa"}, {"Patient/pa"},
             "anonymous"),
            ("GET", f"{gw.dicomweb}/studies?PatientID=pa&PatientName={PLANTED}", {"Authorization": "Bearer x.y.z"},
             None, 401, Interaction.QIDO_STUDIES, Action.EXECUTE, {"pa"}, set(), "anonymous"),
            ("PUT", f"{gw.fhir}/Patient/pa", analyst | FHIR_JSON, {"resourceType": "Patient", "id": "pa"}, 403,
             Interaction.UPDATE, Action.UPDATE, {"pa"}, {"Patient/pa"}, "ana"),
            ("GET", f"{gw.fhir}/AuditEvent?patient=pa", analyst, None, 403, Interaction.SEARCH_TYPE,
             Action.EXECUTE, set(), set(), "ana"),
            ("GET", f"{gw.fhir}/Observation?subject=Patient/pa&date={PLANTED}", admin, None, 400,
             Interaction.SEARCH_TYPE, Action.EXECUTE, {"pa"}, set(), "test-admin"),
            ("GET", f"{gw.fhir}/Patient/nope", admin, None, 404, Interaction.READ, Action.READ, {"nope"},
             {"Patient/nope"}, "test-admin"),
            ("GET", f"{gw.fhir}/Patient/pdel", admin, None, 410, Interaction.READ, Action.READ, {"pdel"},
             {"Patient/pdel"}, "test-admin"),
            ("GET", f"{gw.fhir}/Patient/pa/_history/99", admin, None, 404, Interaction.VREAD, Action.READ, {"pa"},
             {"Patient/pa"}, "test-admin"),
            ("GET", f"{gw.dicomweb}/studies/1.2.3.4/metadata", admin, None, 404, Interaction.WADO, Action.READ,
             set(), {"ImagingStudy/1.2.3.4"}, "test-admin"),
            ("GET", f"{gw.dicomweb}/studies/1.2.3.4/series/1.2.3.5/instances/1.2.3.6", admin, None, 404,
             Interaction.WADO, Action.READ, set(), {"ImagingStudy/1.2.3.4"}, "test-admin"),
            ("GET", f"{gw.dicomweb}/studies?StudyDate={PLANTED}", admin, None, 400, Interaction.QIDO_STUDIES,
             Action.EXECUTE, set(), set(), "test-admin"),
            ("GET", f"{gw.fhir}/Patient/pa/Observation?code={PLANTED}", analyst | {"Authorization": "Bearer bad"},
             None, 401, Interaction.SEARCH_TYPE, Action.EXECUTE, {"pa"}, {"Patient/pa"}, "anonymous"),
            ("GET", f"{gw.url}/no/such/route?name={PLANTED}", admin, None, 404, Interaction.REQUEST,
             Action.EXECUTE, set(), set(), "anonymous"),
        ]
        events: list[dict] = []
        for method, url, headers, body, status, interaction, action, patients, resources, agent in cases:
            async with http.request(method, url, headers=headers,
                                    data=orjson.dumps(body) if body is not None else None) as r:
                assert r.status == status, (method, url, r.status, await r.text())
            now = await _flush_and_events(gw)
            mine, before = now[before:], len(now)
            events += mine
            what = (method, url, mine)
            # one record, or a service's own record of the refusal plus the request-level one naming what it lacked
            assert 1 <= len(mine) <= 2 and all(ev["outcome"] == Outcome.MINOR_FAILURE for ev in mine), what
            assert all(ev["subtype"][0]["code"] == interaction and ev["action"] == action for ev in mine), what
            assert set().union(*map(_patients, mine)) >= patients, what
            assert set().union(*map(_refs, mine)) >= resources, what
            assert mine[-1]["agent"][0]["who"]["identifier"]["value"] == agent, what

    raw = orjson.dumps(events).decode()
    assert PLANTED not in raw and "1.2.3.5" not in raw  # no query values, no concrete paths beyond the study
    # admins find the refused attempts on a patient's record
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.fhir}/AuditEvent", params={"patient": "pa", "outcome": "4"}, headers=admin) as r:
            assert (await r.json())["total"] >= 5


async def _flush_and_events(gw) -> list[dict]:
    from gateway import keys

    await gw.app[keys.AUDIT].flush()
    return await _events(gw.settings)
