"""Issue 27 (ingest at scale): the rows a bulk load through ``fhir_repo.apply_writes`` stores — history, patient
links, search index, common model — are exactly the rows the pure mappings give for the stored versions
(PostgreSQL now writes them as one ``INSERT ... SELECT unnest(arrays)`` per table, SQLite as an executemany;
before, both as executemany), with the values each column's type keeps (floats, NULLs, strings cut at the
column length, numbers in string columns); and searches answer with the resources the generated population
has, counted here from the population itself.  Both engines.
"""

from __future__ import annotations

import orjson
from sqlalchemy import select

from gateway import keys
from gateway.store import fhir_repo
from gateway.store import schema as s
from gateway.store.cm_rows import CM_BY_NAME, row_for
from gateway.store.db import fit_rows
from mappings.fhir.index import extract
from mappings.fhir.links import patient_links
from mappings.fhir.project import project
from tests.fhir_population import COMMON_CODE, patient_resources

_IDX_COLS = {"token": ("param", "system", "code"), "string": ("param", "norm", "exact"), "date": ("param", "lo", "hi"),
             "reference": ("param", "target_type", "target_id"), "quantity": ("param", "value", "system", "code")}

ODD = [  # values at the edges of the column types
    {"resourceType": "Observation", "id": "odd-1", "status": "final", "subject": {"reference": "Patient/sp0"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "x" * 300, "display": "é" * 400}], "text": "ü" * 300},
     "valueQuantity": {"value": 1e-300, "unit": "u" * 80}, "effectiveDateTime": "2020-02-29T23:59:59.999+14:00",
     "identifier": [{"system": "urn:s", "value": 12}]},
    {"resourceType": "Observation", "id": "odd-2", "status": "final", "subject": {"reference": "Patient/sp1"},
     "code": {"coding": [{"code": "n1"}]}, "valueQuantity": {"value": -0.0}, "effectivePeriod": {"end": "2021"},
     "component": [{"code": {"coding": [{"code": "c1"}]}, "valueQuantity": {"value": 7}},
                   {"code": {"coding": [{"code": "c2"}]}, "valueString": "s"}]},
    {"resourceType": "Patient", "id": "odd-p", "name": [{"family": "Ö" * 300, "given": ["", "Zoë"]}],
     "birthDate": "1990", "gender": "other"},
]


async def _all(conn, table, cols) -> list[tuple]:
    return sorted((await conn.execute(select(*[table.c[c] for c in cols]))).all(), key=repr)


async def test_bulk_ingest_rows_are_the_mappings_rows(gateway, http):
    db = gateway.app[keys.DB]
    population = [r for i in range(12) for r in patient_resources(i)] + ODD
    for n in range(0, len(population), 500):  # the scale bench's transactions
        writes = [fhir_repo.Write(r["resourceType"], r["id"], r, None, "PUT") for r in population[n:n + 500]]
        async with db.write() as conn:
            await fhir_repo.apply_writes(conn, writes)
    # a later transaction: sp0's Consent changes (its earlier resources' stamps — and their index rows' — change
    # with it) while new resources of sp0 and of a new patient arrive
    consent = next(r for r in population if r["id"] == "c-sp0")
    changed = consent | {"policyRule": {"coding": [{"system": "http://purl.obolibrary.org/obo/duo",
                                                    "code": "DUO:0000004"}]}}
    later = [changed, {"resourceType": "Observation", "id": "late-1", "status": "final",
                       "subject": {"reference": "Patient/sp0"}, "code": {"coding": [{"code": "late"}]}},
             *patient_resources(40)[:3]]
    async with db.write() as conn:
        prev = await fhir_repo.get_current_many(conn, [(r["resourceType"], r["id"]) for r in later])
        await fhir_repo.apply_writes(conn, [fhir_repo.Write(r["resourceType"], r["id"], r,
                                                            prev.get((r["resourceType"], r["id"])), "PUT")
                                            for r in later])
    population = [r for r in population if r["id"] != "c-sp0"] + later
    R, H, L = s.fhir_resource, s.fhir_history, s.fhir_link
    async with db.read() as conn:
        current = (await conn.execute(select(R.c.rid, R.c.res_type, R.c.res_id, R.c.version, R.c.consent_no,
                                             R.c.patient_id, R.c.content, R.c.last_updated, R.c.lu_ts))).all()
        assert sorted((r.res_type, r.res_id) for r in current) == sorted((r["resourceType"], r["id"]) for r in population)
        stored = {r.rid: r for r in current}
        # history: one version per resource, the same content and stamps as the current row
        hist = await _all(conn, H, ("res_type", "res_id", "version", "last_updated", "lu_ts", "method", "patient_id",
                                    "content"))
        assert [h for h in hist if h[:3] != ("Consent", "c-sp0", 1)] == sorted(
            ((r.res_type, r.res_id, r.version, r.last_updated, r.lu_ts, "PUT", r.patient_id, r.content)
             for r in current), key=repr)
        # patient links (of the current versions)
        links = [lk for lk in await _all(conn, L, ("res_type", "res_id", "version", "patient_id"))
                 if lk[:3] != ("Consent", "c-sp0", 1)]
        assert links == sorted(((r.res_type, r.res_id, r.version, p) for r in current
                                for p in patient_links(orjson.loads(r.content)).ids), key=repr)
        assert len(links) == len(population)  # every resource here names exactly one patient
        # sp0's stamp changed with its Consent, on every resource of sp0 (the index rows: below)
        sp0 = {r.consent_no for r in current if r.patient_id == "sp0"}
        sp3 = {r.consent_no for r in current if r.patient_id == "sp3"}  # sp3: DUO:0000004 from the start
        sp4 = {r.consent_no for r in current if r.patient_id == "sp4"}  # sp4: sp0's DUO:0000042 before
        assert len(sp0) == 1 and sp0 == sp3 and sp0 != sp4
        # search index: the pure extraction of the stored content, made to fit the columns, with the row's stamp
        for kind, table in s.INDEX_TABLES.items():
            cols = ("rid", "res_type", *_IDX_COLS[kind], "consent_no")
            want = []
            for r in current:
                rows = [{"rid": r.rid, "res_type": r.res_type, **dict(zip(_IDX_COLS[kind], v)),
                         "consent_no": r.consent_no} for v in getattr(extract(orjson.loads(r.content)), kind)]
                want.extend(tuple(row[c] for c in cols) for row in fit_rows(table, rows))
            got = await _all(conn, table, cols)
            assert got == sorted(want, key=repr), kind
            assert got, kind
        # common model: the projection of the stored content
        for name, table in CM_BY_NAME.items():
            want_rows = []
            for r in current:
                want_rows.extend(row for t, row in map(row_for, project(orjson.loads(r.content))) if t == name)
            cols = sorted({c for row in want_rows for c in row}) or ["src_id"]
            want = [tuple(row.get(c) for c in cols) for row in fit_rows(table, want_rows)]
            got = await _all(conn, table, cols) if want_rows else []
            assert got == sorted(want, key=repr), name
        assert all(r.consent_no is not None for r in stored.values() if r.patient_id != "odd-p")
    # searches answer with what the population holds (counted from the generated resources)
    h = gateway.headers("clinician")
    want_ids = {r["id"] for r in population if r["resourceType"] == "Observation"
                and any(c.get("code") == COMMON_CODE for c in r["code"]["coding"])}
    async with http.get(f"{gateway.fhir}/Observation", params={"code": f"http://loinc.org|{COMMON_CODE}",
                                                                "_count": "500"}, headers=h) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert {e["resource"]["id"] for e in body.get("entry", [])} == want_ids and len(want_ids) == 12 * 5
    async with http.get(f"{gateway.fhir}/Observation", params={"value-quantity": "lt0.5", "_count": "500"},
                        headers=h) as resp:
        body = await resp.json()
    got = {e["resource"]["id"] for e in body.get("entry", [])}
    assert got == {r["id"] for r in population if r["resourceType"] == "Observation"
                   and r.get("valueQuantity", {}).get("value", 1) < 0.5}
    assert "odd-1" in got and "odd-2" in got
