"""FHIR search paging by keyset cursors and ``_total`` (issue 27; FHIR R4 §3.1.1.6 paging, §3.1.1.5 ``_total``).

A population of two patients — ``p-ok`` (GRU consent, permitted for a GRU research purpose) and ``p-no``
(no consent, refused) — with interleaved Observations (some without a date, so a ``_sort`` key is NULL).
Following the ``next`` links page by page must give exactly the rows of one big page, in the same order,
for a treatment requester (all) and a research requester (``p-ok``'s only); a cursor is bound to its
search and its requester, and a damaged one is refused.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp

from tests.integration.test_consent_enforcement import FHIR_JSON, consent, patient, site  # noqa: F401 (fixture)
from tests.integration.test_consent_leaks import research

N_EACH = 13


def _obs(n: int, pid: str) -> dict:
    res = {"resourceType": "Observation", "id": f"o-{pid}-{n}", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 50 + n % 5, "unit": "/min"}}
    if n % 4:  # every fourth has no date: its date sort key is NULL (sorted last either way)
        res["effectiveDateTime"] = f"2020-01-{1 + n % 6:02d}"  # repeated dates: ties broken by rid
    return res


async def _load(gw, http) -> None:
    resources = [patient("p-ok"), patient("p-no"), consent("p-ok", ["DUO:0000042"], [], {})]
    for n in range(N_EACH):
        resources += [_obs(n, "p-ok"), _obs(n, "p-no")]
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
               for r in resources]
    async with http.post(gw.fhir, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                         headers=gw.headers("ehr-system") | FHIR_JSON) as r:
        assert r.status == 200, await r.text()


async def _get(http, url: str, headers: dict, params=None) -> dict:
    async with http.get(url, headers=headers, params=params) as r:
        assert r.status == 200, (url, await r.text())
        return await r.json()


def _ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def _link(bundle: dict, rel: str) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == rel), None)


async def _walk(http, url: str, headers: dict, params: dict) -> tuple[list[str], list[dict]]:
    """Every page from the first, following ``next`` links as given."""
    pages = [await _get(http, url, headers, params)]
    while (nxt := _link(pages[-1], "next")) is not None:
        assert "_offset" not in nxt and "_cursor=" in nxt, nxt
        pages.append(await _get(http, nxt, headers))
        assert len(pages) < 100
    return [i for p in pages for i in _ids(p)], pages


SEARCHES = [
    ("Observation", {"code": "http://loinc.org|8867-4"}),  # token lookup drives, rid order
    ("Observation", {"code": "8867-4", "_sort": "-date"}),  # nullable index sort key, descending
    ("Observation", {"_sort": "date,-_id"}),  # two keys, mixed directions
    ("Observation", {"_sort": "-_lastUpdated"}),
    ("Observation", {"value-quantity": "ge51"}),  # quantity range: walked in (value, rid) order
    ("Observation", {"value-quantity": "lt53", "code": "8867-4"}),  # token drives, quantity probe
    ("Observation", {"date": "ge2020-01-03"}),  # date ranges walked by their end (hi) / start (lo)
    ("Observation", {"date": "lt2020-01-05"}),
    ("Observation", {"date": "eq2020-01"}),
    ("Observation", {"_lastUpdated": "gt2000-01-01"}),  # (lu_ts, rid) order: one transaction, all ties
    ("Observation", {"_lastUpdated": "gt2000-01-01", "status": "final"}),
    ("Observation", {"code": "8867-4", "status": "final"}),  # token walk + a probe on the same index table
    ("Observation", {"subject": "Patient/p-ok", "code": "8867-4"}),  # reference walk + token probe
    ("Patient/p-ok/Observation", {}),  # compartment
]


async def test_cursor_pages_equal_one_page_for_each_scope(site, db_url):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        for who, headers, expect_no in (("treatment", gw.headers("clinician"), True),
                                        ("research", research(gw), False)):
            for path, params in SEARCHES:
                url = f"{gw.fhir}/{path}"
                whole = _ids(await _get(http, url, headers, {**params, "_count": "1000"}))
                one_patient = "p-ok" in path + str(params)
                assert whole and (any("p-no" in i for i in whole) == (expect_no and not one_patient)), (who, path)
                got, pages = await _walk(http, url, headers, {**params, "_count": "4"})
                assert got == whole, (who, path, params)
                assert len(pages) == -(-len(whole) // 4)
                # _total: not counted by default, except on the page that reaches the end (free)
                assert "total" not in pages[0] and pages[-1]["total"] == len(whole), (who, path)
                counted = await _get(http, url, headers, {**params, "_count": "4", "_total": "accurate"})
                assert counted["total"] == len(whole)
                # every page of a counted search carries the total, the cursor pages too
                second = await _get(http, _link(counted, "next"), headers)
                assert second["total"] == len(whole) and _ids(second) == whole[4:8]
                assert _link(second, "previous") and "_offset=0" in _link(second, "previous")
                none = await _get(http, url, headers, {**params, "_total": "none", "_count": "1000"})
                assert "total" not in none


async def test_cursor_is_bound_to_its_search_and_requester(site, db_url):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        hr, ht = research(gw), gw.headers("clinician")
        url = f"{gw.fhir}/Observation"
        first = await _get(http, url, hr, {"code": "8867-4", "_count": "3"})
        nxt = _link(first, "next")
        params = dict(parse_qsl(urlsplit(nxt).query))
        cursor = params["_cursor"]

        async def status(headers, p) -> tuple[int, dict]:
            async with http.get(url, headers=headers, params=p) as r:
                return r.status, await r.json()

        assert (await status(hr, params))[0] == 200
        refused = [
            (ht, params),  # another requester (treatment: would see p-no's rows)
            (gw.headers("analyst", purpose={"codes": ["DUO:0000006"]}), params),  # same role, other purpose
            (hr, {**params, "code": "http://loinc.org|8867-4"}),  # another search
            (hr, {**params, "_count": "1000"}),
            (hr, {**params, "_sort": "-date"}),
            (hr, {**params, "_cursor": cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")}),  # damaged MAC
            (hr, {**params, "_cursor": "x" + cursor}),  # damaged payload
            (hr, {**params, "_cursor": "not-a-cursor"}),
            (hr, {**params, "_offset": "3"}),  # both ways of saying where the page starts
        ]
        for headers, p in refused:
            code, body = await status(headers, p)
            assert code == 400 and body["resourceType"] == "OperationOutcome", (p, body)
            assert body["issue"][0]["expression"] == ["_cursor"]
        # a treatment requester's cursor is no use to research either
        tnext = _link(await _get(http, url, ht, {"code": "8867-4", "_count": "3"}), "next")
        assert (await status(hr, dict(parse_qsl(urlsplit(tnext).query))))[0] == 400
        # _offset (old next links, explicit client paging) still pages, through the same consent scope
        by_offset = await _get(http, url, hr, {"code": "8867-4", "_count": "3", "_offset": "3"})
        by_cursor = await _get(http, nxt, hr)
        assert _ids(by_offset) == _ids(by_cursor) and all("p-ok" in i for i in _ids(by_offset))
        assert _link(by_offset, "next") and "_cursor=" in _link(by_offset, "next")
        # the next link keeps the request's parameters (and only them)
        assert urlencode({"code": "8867-4"}) in nxt and "_count=3" in nxt
