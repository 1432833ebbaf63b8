"""Issue #19 property test: a resource of *every* R4 type, linked to a refused patient through *each*
reference path, is returned by no FHIR route to a research requester.

For every resource type the ``fhir.resources`` models build (``tests.fhir_synth``), a minimal valid
resource is linked to ``p-no`` (no consent) through: each reference element that may point at a Patient
(top level and one backbone level down), an extension's ``valueReference``, a ``type: Patient`` +
identifier reference, and a contained Patient carrying ``p-no``'s identifier.  An unlinked copy of each
type is the control (visible to research).  Seeded and time-bounded (``BUDGET_S`` to build the sample).
"""

from __future__ import annotations

import random
import time

import aiohttp

from tests.fhir_synth import minimal, patient_paths, resource_types, with_reference
from tests.integration.test_consent_enforcement import FHIR_JSON, consent, patient, site  # (fixture)

SEED = 19
BUDGET_S = 20.0
IDENT = {"system": "urn:fedgate:test", "value": "p-no"}


def _ext(ref: dict) -> list[dict]:
    return [{"url": "https://fedgate.dev/test/link", "valueReference": ref}]


def build(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(linked resources, unlinked controls)."""
    linked, controls = [], []
    deadline = time.monotonic() + BUDGET_S
    types = list(resource_types())
    rng.shuffle(types)
    for t in types:
        if time.monotonic() > deadline:
            break
        short = t[:40]
        base = minimal(t, f"{short}-ctl")
        if base is None:
            continue
        controls.append(base)
        variants: list[dict | None] = []
        paths = patient_paths(t)
        for i, p in enumerate(paths):
            variants.append(with_reference(dict(base, id=f"{short}-p{i}"), p, {"reference": "Patient/p-no"}))
        variants.append(dict(base, id=f"{short}-ext", extension=_ext({"reference": "Patient/p-no"})))
        if paths:
            variants.append(with_reference(dict(base, id=f"{short}-ident"), paths[0],
                                           {"type": "Patient", "identifier": IDENT}))
        variants.append(dict(base, id=f"{short}-cont", extension=_ext({"reference": "#pt"}),
                             contained=[{"resourceType": "Patient", "id": "pt", "identifier": [IDENT]}]))
        linked.extend(v for v in variants if v is not None)
    return linked, controls


async def _batch(http, gw, entries: list[dict], headers: dict, kind: str = "batch") -> list[dict]:
    out = []
    for i in range(0, len(entries), 250):
        async with http.post(gw.fhir, json={"resourceType": "Bundle", "type": kind, "entry": entries[i:i + 250]},
                             headers=headers | FHIR_JSON) as r:
            assert r.status == 200, await r.text()
            out += (await r.json())["entry"]
    return out


async def test_no_route_returns_a_refused_patients_resource_of_any_type(site, db_url):
    gw = site
    rng = random.Random(SEED)
    linked, controls = build(rng)
    assert len(controls) > 100 and len(linked) > 300, (len(controls), len(linked))
    async with aiohttp.ClientSession() as http:
        writer = gw.headers("ehr-system")
        setup = [patient("p-ok"), patient("p-no"), consent("p-ok", ["DUO:0000042"], [], {}),
                 {"resourceType": "Organization", "id": "org-1", "name": "Site"}]
        put = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
               for r in setup + controls + linked]
        answers = await _batch(http, gw, put, writer, "transaction")  # (one commit per 250)
        stored = {(e["resourceType"], e["id"]) for e, a in zip(setup + controls + linked, answers)
                  if a["response"]["status"].split()[0] in ("200", "201")}
        linked = [r for r in linked if (r["resourceType"], r["id"]) in stored]
        controls = [r for r in controls if (r["resourceType"], r["id"]) in stored]
        assert len(linked) > 300, len(linked)
        hidden = {f"{r['resourceType']}/{r['id']}" for r in linked}
        hr = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        ht = gw.headers("clinician")

        # read and vread (batch GET: the same service calls as the direct routes), research vs treatment
        gets = [{"request": {"method": "GET", "url": u}} for ref in sorted(hidden) for u in (ref, f"{ref}/_history/1")]
        statuses = [a["response"]["status"].split()[0] for a in await _batch(http, gw, gets, hr)]
        wrong = [g["request"]["url"] for g, s in zip(gets, statuses) if s != "404"]
        assert not wrong, wrong[:20]
        # (treatment sees them: the per-type counts below)
        # direct reads of a seeded sample
        for ref in rng.sample(sorted(hidden), 40):
            async with http.get(f"{gw.fhir}/{ref}", headers=hr) as r:
                assert r.status == 404, ref
        # controls (no patient link) stay visible to research
        for r in rng.sample(controls, 20):
            async with http.get(f"{gw.fhir}/{r['resourceType']}/{r['id']}", headers=hr) as resp:
                assert resp.status == 200, r["resourceType"]
        # searches and type history of every type; system history
        types = sorted({r["resourceType"] for r in linked})
        for t in types:
            for url in (f"{gw.fhir}/{t}", f"{gw.fhir}/{t}/_history"):
                async with http.get(url, headers=hr, params={"_count": "1000"}) as r:
                    assert r.status == 200, (url, await r.text())
                    body = await r.json()
                got = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])
                       if "resource" in e}
                assert not got & hidden, (url, sorted(got & hidden)[:5])
            async with http.get(f"{gw.fhir}/{t}", headers=ht, params={"_summary": "count"}) as r:
                assert (await r.json())["total"] >= 1 + sum(1 for x in linked if x["resourceType"] == t), t
        offset = 0
        while True:
            async with http.get(f"{gw.fhir}/_history", headers=hr, params={"_count": "1000", "_offset": str(offset)}) as r:
                assert r.status == 200
                body = await r.json()
            got = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])
                   if "resource" in e}
            assert not got & hidden, sorted(got & hidden)[:5]
            if len(body.get("entry", [])) < 1000:
                break
            offset += 1000
