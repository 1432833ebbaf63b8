"""Lossless OMOP round trip (issue 23), both store engines: Synthea → export → import into a fresh site
→ export again gives identical OMOP tables; codes the vocabulary does not map travel as site-local
concepts (ids > 2,000,000,000, a vocabulary per code system whose VOCABULARY.vocabulary_reference is the
system URI), so every `system|code` cohort answers the same before and after."""

from __future__ import annotations

import aiohttp
import asyncpg
from sqlalchemy import select

from gateway import keys
from gateway.store import schema as s
from gateway.store.cohort import compile_cohort
from gateway.store.scope import UNRESTRICTED
from mappings.cohort.language import parse
from tests.conftest import drop_pg_database
from tests.integration.test_omop import (  # omop_pg is a fixture
    FEDERATED_COHORTS,
    PURPOSE,
    _load_synthea,
    _second_store,
    _site,
    omop_pg,
)

TABLES = ("person", "observation_period", "visit_occurrence", "condition_occurrence", "procedure_occurrence",
          "measurement", "observation", "death", "image_occurrence", "image_feature", "concept", "vocabulary",
          "domain", "concept_class")


async def _tables(url: str, schema: str) -> dict[str, list[tuple]]:
    conn = await asyncpg.connect(url)
    try:
        return {t: sorted(tuple(r) for r in await conn.fetch(f'SELECT * FROM "{schema}"."{t}"')) for t in TABLES}
    finally:
        await conn.close()


async def _cohorts(gw, docs) -> list[int]:
    out = []
    async with gw.app[keys.DB].read() as conn:
        for doc in docs:
            out.append(len((await conn.execute(compile_cohort(parse(doc), UNRESTRICTED))).all()))
    return out


async def test_export_import_export_is_identical_and_cohorts_agree(tmp_path, db_url, omop_pg):
    async with aiohttp.ClientSession() as http:
        a = await _site(tmp_path / "a", db_url, omop_pg)
        b_url, b_name = await _second_store(db_url, tmp_path)
        b = None
        try:
            await _load_synthea(a, http)
            async with http.post(a.url + "/omop/export", json={"format": "postgresql", "schema": "cdm1"},
                                 headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
            b = await _site(tmp_path / "b", b_url, omop_pg)
            async with http.post(b.url + "/omop/import", json={"schema": "cdm1"}, headers=b.headers("admin")) as r:
                assert r.status == 200, await r.text()
            async with http.post(b.url + "/omop/export", json={"format": "postgresql", "schema": "cdm2"},
                                 headers=b.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
            first, second = await _tables(omop_pg, "cdm1"), await _tables(omop_pg, "cdm2")
            for t in TABLES:
                assert first[t] == second[t], t
            conn = await asyncpg.connect(omop_pg)
            try:
                local = await conn.fetchval("SELECT count(*) FROM cdm1.concept WHERE concept_id > 2000000000")
                unmapped_src = await conn.fetchval(
                    "SELECT count(*) FROM cdm1.condition_occurrence WHERE condition_source_concept_id = 0")
                refs = {r[0] for r in await conn.fetch(
                    "SELECT vocabulary_reference FROM cdm1.vocabulary WHERE vocabulary_id LIKE 'FG-%'")}
            finally:
                await conn.close()
            assert local > 0 and unmapped_src == 0
            assert "http://snomed.info/sct" in refs
            # every coded condition / procedure / observation as a system|code cohort: same answers
            docs = list(FEDERATED_COHORTS)
            for kind, table in (("condition", s.cm_condition), ("procedure", s.cm_procedure),
                                ("observation", s.cm_observation)):
                async with a.app[keys.DB].read() as conn:
                    pairs = (await conn.execute(select(table.c.system, table.c.code).distinct()
                                                .where(table.c.code.is_not(None)))).all()
                docs += [{kind: {"code": f"{sy}|{co}" if sy else co}} for sy, co in sorted(pairs, key=str)]
            before, after = await _cohorts(a, docs), await _cohorts(b, docs)
            assert len(docs) > 100
            assert [d for d, x, y in zip(docs, before, after) if x != y] == []
            # a re-import of the second export changes nothing (import → export → import is idempotent)
            async with http.post(b.url + "/omop/import", json={"schema": "cdm2"}, headers=b.headers("admin")) as r:
                assert r.status == 200, await r.text()
                changes = (await r.json())["changes"]
            assert all(c["inserted"] == c["updated"] == c["deleted"] == 0 for c in changes.values()), changes
        finally:
            await a.server.close()
            if b is not None:
                await b.server.close()
            if b_name:
                await drop_pg_database(b_name)
