"""Writes by a research (restricted) scope tell nothing about resources it may not read.

A site/admin token with a research purpose may write.  A PUT to the id of a refused patient's resource
used to answer 200 (updated: it exists) where a never-existing id answered 201, and it overwrote the
refused resource.  Rule (docs/consent.md): a restricted scope writes by id only what it may read — an
update of anything else answers 404 exactly like an unknown id (no update-as-create with a client-assigned
id), a delete answers like deleting nothing, conditional operations are refused (403) whatever they match —
and the refused resource is never changed.  Each pair of requests below differs only in the id (same
length), and the answers must be identical in status, headers and body.
"""

from __future__ import annotations

import re
import uuid

import aiohttp

from tests.conftest import Gateway
from tests.integration.test_consent_enforcement import FHIR_JSON, patient, site  # noqa: F401 (fixture)
from tests.integration.test_consent_leaks import GRU, _load, _put, obs

#: (refused resource, never-existing id of the same length)
PAIRS = (("Patient", "p-no", "p-zz"), ("Observation", "obs-no", "obs-zz"))
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
COMPARED = ("ETag", "Location", "Last-Modified", "Content-Type", "Content-Length", "Content-Location")


async def _answer(http, method: str, url: str, headers: dict, rid: str, **kw) -> tuple:
    async with http.request(method, url, headers=headers, **kw) as r:
        body = _UUID.sub("{uuid}", (await r.read()).decode().replace(rid, "{id}"))  # (a Bundle's own id)
        return r.status, {h: r.headers.get(h, "").replace(rid, "{id}") for h in COMPARED}, body


def _tx(kind: str, method: str, url: str, res: dict | None = None) -> dict:
    entry: dict = {"request": {"method": method, "url": url}}
    if res is not None:
        entry["resource"] = res
        entry["fullUrl"] = f"urn:uuid:{uuid.UUID(int=0)}"
    return {"resourceType": "Bundle", "type": kind, "entry": [entry]}


async def _probe(http, gw: Gateway, h: dict, res_type: str, rid: str) -> list:
    """Every write by id (and conditional write) naming ``res_type/rid``, with its answer."""
    body = patient(rid) if res_type == "Patient" else obs(rid, "p-ok")
    body = {**body, "id": rid}
    url = f"{gw.fhir}/{res_type}/{rid}"
    out = [
        await _answer(http, "PUT", url, h, rid, json=body),
        await _answer(http, "PUT", url, h | {"If-Match": 'W/"1"'}, rid, json=body),
        await _answer(http, "DELETE", url, h, rid),
        await _answer(http, "PATCH", url, h | {"Content-Type": "application/json-patch+json"}, rid,
                      json=[{"op": "replace", "path": "/status", "value": "final"}] if res_type != "Patient"
                      else [{"op": "replace", "path": "/gender", "value": "other"}]),
        await _answer(http, "POST", gw.fhir, h, rid, json=_tx("transaction", "PUT", f"{res_type}/{rid}", body)),
        await _answer(http, "POST", gw.fhir, h, rid, json=_tx("transaction", "DELETE", f"{res_type}/{rid}")),
        await _answer(http, "POST", gw.fhir, h, rid, json=_tx("batch", "PUT", f"{res_type}/{rid}", body)),
        await _answer(http, "POST", gw.fhir, h, rid, json=_tx("batch", "DELETE", f"{res_type}/{rid}")),
        # conditional create / update / delete naming the id
        await _answer(http, "POST", f"{gw.fhir}/{res_type}", h | {"If-None-Exist": f"_id={rid}"}, rid,
                      json={k: v for k, v in body.items() if k != "id"}),
        await _answer(http, "POST", gw.fhir, h, rid,
                      json=_tx("transaction", "PUT", f"{res_type}?_id={rid}", {k: v for k, v in body.items()
                                                                               if k != "id"})),
        await _answer(http, "POST", gw.fhir, h, rid, json=_tx("transaction", "DELETE", f"{res_type}?_id={rid}")),
    ]
    return out


async def _current(http, gw: Gateway, res_type: str, rid: str) -> tuple[int, str]:
    async with http.get(f"{gw.fhir}/{res_type}/{rid}", headers=gw.headers("clinician")) as r:
        return r.status, r.headers.get("ETag", "")


async def test_restricted_writes_answer_a_refused_id_like_an_unknown_one(site, db_url):  # noqa: F811
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        await _put(http, gw, obs("obs-no", "p-no"))
        await _put(http, gw, obs("obs-ok", "p-ok"))
        before = {(t, i): await _current(http, gw, t, i) for t, i, _ in PAIRS}
        assert all(st == 200 for st, _ in before.values())
        for role in ("site", "admin"):
            h = gw.headers(role, purpose=GRU) | FHIR_JSON
            for res_type, refused, unknown in PAIRS:
                a = await _probe(http, gw, h, res_type, refused)
                b = await _probe(http, gw, h, res_type, unknown)
                for n, (x, y) in enumerate(zip(a, b)):
                    assert x == y, (role, res_type, n, x, y)
                assert a[0][0] == 404 and a[2][0] == 204, a[:3]  # update: 404; delete: like deleting nothing
        # the refused resources were never changed, the unknown ids never created
        for res_type, refused, unknown in PAIRS:
            assert await _current(http, gw, res_type, refused) == before[(res_type, refused)], refused
            assert (await _current(http, gw, res_type, unknown))[0] == 404, unknown


async def test_restricted_writes_still_update_and_delete_what_they_may_read(site, db_url):  # noqa: F811
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        await _put(http, gw, obs("obs-ok", "p-ok"))
        h = gw.headers("site", purpose=GRU) | FHIR_JSON
        async with http.put(f"{gw.fhir}/Observation/obs-ok", json=obs("obs-ok", "p-ok", status="amended"),
                            headers=h | {"If-Match": 'W/"1"'}) as r:
            assert r.status == 200 and r.headers["ETag"] == 'W/"2"', await r.text()
        async with http.put(f"{gw.fhir}/Observation/obs-ok", json=obs("obs-ok", "p-ok"),
                            headers=h | {"If-Match": 'W/"1"'}) as r:
            assert r.status == 412, await r.text()  # a visible resource: the precondition is checked
        async with http.post(f"{gw.fhir}/Observation", json={k: v for k, v in obs("x", "p-ok").items() if k != "id"}, headers=h) as r:
            assert r.status == 201, await r.text()  # server-assigned ids: create as before
        async with http.delete(f"{gw.fhir}/Observation/obs-ok", headers=h) as r:
            assert r.status == 204 and r.headers.get("ETag") == 'W/"3"'
        # treatment and site scopes keep FHIR's update-as-create (201) and 200
        ht = gw.headers("site", purpose="treatment") | FHIR_JSON
        async with http.put(f"{gw.fhir}/Observation/obs-new", json=obs("obs-new", "p-no"), headers=ht) as r:
            assert r.status == 201
        async with http.put(f"{gw.fhir}/Observation/obs-new", json=obs("obs-new", "p-no"), headers=ht) as r:
            assert r.status == 200
