"""Issue 2 acceptance: every official R4 example and every Synthea bundle goes in through a real FHIR
client (fhirpy) and comes back equal; search answers are checked against counts computed here,
independently, from the source files (plain JSON walking — not through any fedgate code).

Runs on both engines (the ``gateway`` fixture is parametrised over SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import copy
import json
import unicodedata
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fhirpy import AsyncFHIRClient

from tests.conftest import ENGINES, PG_ADMIN, create_pg_database, data_path, drop_pg_database, make_settings, start_gateway

EXAMPLES = sorted(p for p in data_path("fhir-examples").glob("*.json"))
SYNTHEA = sorted(data_path("synthea").glob("*.json"))


def _client(gateway, role: str = "ehr-system") -> AsyncFHIRClient:
    return AsyncFHIRClient(gateway.fhir, authorization=f"Bearer {gateway.token(role)}")


def _strip_server_meta(res: dict) -> dict:
    res = copy.deepcopy(res)
    meta = res.get("meta")
    if isinstance(meta, dict):
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            res.pop("meta")
    return res


async def _gather_chunked(coros, size: int = 32) -> list:
    out = []
    for i in range(0, len(coros), size):
        out.extend(await asyncio.gather(*coros[i:i + size]))
    return out


# --------------------------------------------------------------------------------------------- examples


async def test_every_official_example_round_trips(gateway):
    assert len(EXAMPLES) >= 80, "the official examples are missing"
    client = _client(gateway)
    originals = [json.loads(p.read_text()) for p in EXAMPLES]

    async def put(res: dict) -> None:
        body = {k: v for k, v in res.items() if k != "resourceType"}
        await client.resource(res["resourceType"], **copy.deepcopy(body)).save()

    for res in originals:  # sequential: examples reference each other; order does not matter for PUT
        await put(res)

    async def read(res: dict) -> dict:
        return (await client.reference(res["resourceType"], res["id"]).to_resource()).serialize()

    back = await _gather_chunked([read(r) for r in originals])
    mismatches = [o["resourceType"] + "/" + o["id"] for o, b in zip(originals, back)
                  if _strip_server_meta(o) != _strip_server_meta(b)]
    assert not mismatches, f"read back differs for {mismatches}"

    # counts per type computed from the files
    per_type = Counter(r["resourceType"] for r in originals)
    for rtype, n in per_type.items():
        assert await client.resources(rtype).count() == n, rtype
    # versioned read-back: a second PUT makes version 2, vread of 1 gives the original
    pat = next(r for r in originals if r["resourceType"] == "Patient")
    changed = dict(pat, active=not pat.get("active", False))
    await put(changed)
    v1 = await client.execute(f"Patient/{pat['id']}/_history/1", method="get")
    assert _strip_server_meta(v1) == _strip_server_meta(pat)
    current = (await client.reference("Patient", pat["id"]).to_resource()).serialize()
    assert current["meta"]["versionId"] == "2" and current["active"] == changed["active"]


# ---------------------------------------------------------------------------------------------- synthea


def _fold(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).casefold()


def _instant(value: str) -> datetime:
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _replace_refs(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else _replace_refs(v, mapping))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_refs(v, mapping) for v in node]
    return node


def _codings(res: dict, field: str = "code") -> list[tuple[str, str]]:
    return [(c.get("system", ""), c.get("code", "")) for c in (res.get(field) or {}).get("coding", [])]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def synthea_gateway(request, tmp_path_factory):
    """One gateway per engine for the Synthea tests (they only read what synthea_loaded stored)."""
    tmp_path = tmp_path_factory.mktemp("synthea")
    if request.param == "sqlite":
        db_url, pg = f"sqlite:///{tmp_path / 'fedgate.db'}", None
    else:
        pg = await create_pg_database()
        db_url = f"{PG_ADMIN}/{pg}"
    gw = await start_gateway(make_settings(tmp_path / "data", db_url))
    try:
        yield gw
    finally:
        await gw.server.close()
        if pg is not None:
            await drop_pg_database(pg)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def synthea_loaded(synthea_gateway):
    """POST every Synthea transaction bundle through fhirpy (once per engine); returns (client, [(original,
    stored_id)])."""
    client = _client(synthea_gateway)
    loaded: list[tuple[dict, str]] = []
    for path in SYNTHEA:
        bundle = json.loads(path.read_text())
        response = await client.execute("", method="post", data=bundle)
        assert response["type"] == "transaction-response"
        assert len(response["entry"]) == len(bundle["entry"])
        mapping: dict[str, str] = {}
        for entry, out in zip(bundle["entry"], response["entry"]):
            assert out["response"]["status"].startswith("201"), out["response"]
            rtype, rid = out["response"]["location"].split("/")[:2]
            assert rtype == entry["resource"]["resourceType"]
            mapping[entry["fullUrl"]] = f"{rtype}/{rid}"
        for entry in bundle["entry"]:
            original = _replace_refs(entry["resource"], mapping)
            loaded.append((original, mapping[entry["fullUrl"]].split("/")[1]))
    return client, loaded


@pytest.mark.asyncio(loop_scope="module")
async def test_synthea_bundles_round_trip(synthea_loaded):
    client, loaded = synthea_loaded
    assert len(SYNTHEA) >= 28 and len(loaded) > 2000

    async def read(original: dict, rid: str) -> dict:
        return (await client.reference(original["resourceType"], rid).to_resource()).serialize()

    back = await _gather_chunked([read(o, rid) for o, rid in loaded])
    bad = []
    for (original, rid), stored in zip(loaded, back):
        expected = dict(original, id=rid)
        if _strip_server_meta(expected) != _strip_server_meta(stored):
            bad.append(f"{original['resourceType']}/{rid}")
    assert not bad, f"{len(bad)} resources differ, e.g. {bad[:5]}"


@pytest.mark.asyncio(loop_scope="module")
async def test_synthea_search_counts_match_source(synthea_loaded, synthea_gateway):
    client, loaded = synthea_loaded
    gateway = synthea_gateway
    by_type: dict[str, list[dict]] = defaultdict(list)
    for original, rid in loaded:
        by_type[original["resourceType"]].append(dict(original, id=rid))
    patients = by_type["Patient"]
    observations = by_type["Observation"]

    # gender (token)
    for gender in ("female", "male"):
        expected = sum(1 for p in patients if p.get("gender") == gender)
        assert await client.resources("Patient").search(gender=gender).count() == expected

    # family (string: case- and accent-insensitive starts-with) and :exact
    families = Counter(n["family"] for p in patients for n in p.get("name", []) if n.get("family"))
    for family in list(families)[:5]:
        prefix = family[:3]
        expected = sum(1 for p in patients
                       if any(_fold(n.get("family", "")).startswith(_fold(prefix)) for n in p.get("name", [])))
        assert await client.resources("Patient").search(family=prefix.lower()).count() == expected, prefix
        exact = sum(1 for p in patients if any(n.get("family") == family for n in p.get("name", [])))
        assert await client.resources("Patient").search(**{"family:exact": family}).count() == exact

    # Observation?patient=…&code=… for each patient's most frequent code, and per-patient totals
    for p in patients[:10]:
        ref = f"Patient/{p['id']}"
        mine = [o for o in observations if o.get("subject", {}).get("reference") == ref]
        assert await client.resources("Observation").search(patient=p["id"]).count() == len(mine)
        if not mine:
            continue
        (system, code), n = Counter(c for o in mine for c in _codings(o)[:1]).most_common(1)[0]
        got = await client.resources("Observation").search(patient=p["id"], code=f"{system}|{code}").count()
        assert got == sum(1 for o in mine if (system, code) in _codings(o))
        # paging: follow next links with _count=7 and see every matching resource exactly once
        fetched = await client.resources("Observation").search(patient=p["id"]).limit(7).fetch_all()
        assert sorted(r["id"] for r in fetched) == sorted(o["id"] for o in mine)

    # Condition by code across all patients
    conditions = by_type["Condition"]
    (system, code), _ = Counter(c for cond in conditions for c in _codings(cond)[:1]).most_common(1)[0]
    expected = sum(1 for cond in conditions if (system, code) in _codings(cond))
    assert await client.resources("Condition").search(code=f"{system}|{code}").count() == expected

    # date ranges on Observation (effectiveDateTime instants, compared in UTC)
    cut = datetime(2015, 1, 1, tzinfo=timezone.utc)
    dated = [o for o in observations if "effectiveDateTime" in o]
    assert len(dated) == len(observations)
    assert await client.resources("Observation").search(date="ge2015-01-01").count() == \
        sum(1 for o in dated if _instant(o["effectiveDateTime"]) >= cut)
    assert await client.resources("Observation").search(date="lt2015-01-01").count() == \
        sum(1 for o in dated if _instant(o["effectiveDateTime"]) < cut)

    # value-quantity with a prefix, on the most common quantity code
    with_q = [o for o in observations if "valueQuantity" in o]
    (system, code), _ = Counter(_codings(o)[0] for o in with_q).most_common(1)[0]
    values = sorted(o["valueQuantity"]["value"] for o in with_q if _codings(o)[0] == (system, code))
    threshold = values[len(values) // 2]
    got = await client.resources("Observation").search(code=f"{system}|{code}",
                                                        **{"value-quantity": f"gt{threshold}"}).count()
    assert got == sum(1 for v in values if v > threshold)

    # birthdate (date, partial) and _include / _revinclude
    year = sorted(p["birthDate"][:4] for p in patients)[len(patients) // 2]
    assert await client.resources("Patient").search(birthdate=year).count() == \
        sum(1 for p in patients if p["birthDate"].startswith(year))
    p = patients[0]
    mine = [o for o in observations if o["subject"]["reference"] == f"Patient/{p['id']}"]
    bundle = await client.execute("Patient", method="get",
                                  params={"_id": p["id"], "_revinclude": "Observation:patient"})
    modes = Counter((e["search"]["mode"], e["resource"]["resourceType"]) for e in bundle["entry"])
    assert modes == Counter({("match", "Patient"): 1, ("include", "Observation"): len(mine)})
    bundle = await client.execute("Observation", method="get",
                                  params={"patient": p["id"], "_include": "Observation:patient", "_count": "500"})
    included = [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert included == [p["id"]]
    assert bundle["total"] == len(mine)

    # _sort by date (descending) and by _lastUpdated; POST _search gives the same matches as GET
    sorted_back = await client.execute("Observation", method="get",
                                       params={"patient": p["id"], "_sort": "-date", "_count": "500"})
    got = [_instant(e["resource"]["effectiveDateTime"]) for e in sorted_back["entry"]]
    assert got == sorted((_instant(o["effectiveDateTime"]) for o in mine), reverse=True)
    by_lu = await client.execute("Observation", method="get",
                                 params={"patient": p["id"], "_sort": "_lastUpdated", "_count": "500"})
    stamps = [e["resource"]["meta"]["lastUpdated"] for e in by_lu["entry"]]
    assert stamps == sorted(stamps) and len(stamps) == len(mine)
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.fhir}/Observation/_search", data={"patient": p["id"], "_count": "500"},
                             headers=gateway.headers("clinician")) as r:
            assert r.status == 200
            posted = await r.json()
    assert sorted(e["resource"]["id"] for e in posted["entry"]) == sorted(o["id"] for o in mine)
