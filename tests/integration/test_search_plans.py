"""Every FHIR search parameter type is served by an index, on both engines (issue 27).

A generated Synthea-shaped store (tests/fhir_population.py, 4,000 resources, statistics refreshed as the
gateway does after bulk writes), then the statement of a first page and of a cursor page (keyset paging)
for a search of each parameter type — token, string, date, reference, quantity, ``_id``,
``_lastUpdated``, compartment — for an unrestricted and a research (consent-gated) scope, checked with
EXPLAIN: no full scan of the resource table or of a search-index / link table.

SQLite: ``EXPLAIN QUERY PLAN`` has no ``SCAN`` of those tables, nor a ``SEARCH`` that walks all of them or
all of one type / parameter (constrained by ``rowid>?`` or by the type and parameter alone).
PostgreSQL: at this size a sequential scan is often the cheaper plan, so the check is that an index plan
*exists* — with ``enable_seqscan = off`` the planner still falls back to a ``Seq Scan`` when no index can
serve the query, and that is what fails.  How fast the plans are at 100k / 1M resources is bench/scale.py's.
"""

from __future__ import annotations

import json
import re

from sqlalchemy import select

from gateway.store import fhir_repo
from gateway.store import schema as s
from gateway.store.db import Database
from gateway.store.migrate import migrate
from gateway.store.scope import AccessScope
from mappings.fhir.search import parse_search
from tests.fhir_population import population

N = 4000
MAIN = re.compile(r"^(fhir_resource|fhir_history|fhir_link|idx_\w+)$")
#: a SEARCH that is a scan in disguise: the whole table in rowid order, every row of a type or of a parameter
WIDE = re.compile(r"^SEARCH (fhir_resource|fhir_history|fhir_link|idx_\w+) USING .*"
                  r"\((rowid[<>]\?|res_type=\?|res_type=\? AND param=\?)\)$")
SEARCHES = [
    ("token", "Observation", [("code", "http://loinc.org|8867-4")]),
    ("token without system", "Patient", [("gender", "female")]),
    ("token and token", "Observation", [("code", "8867-4"), ("status", "final")]),
    ("string", "Patient", [("name", "Smith")]),
    ("date", "Observation", [("date", "ge2018-06-01")]),
    ("reference", "Observation", [("subject", "Patient/sp3")]),
    ("quantity", "Observation", [("value-quantity", "gt150")]),
    ("_id", "Observation", [("_id", "o3-4,o5-6")]),
    ("_lastUpdated", "Observation", [("_lastUpdated", "gt2000-01-01")]),
    ("compartment", "Observation", []),
    ("compartment and token", "Observation", [("code", "8867-4")]),
]


async def _load(db: Database) -> None:
    batch: list = []
    for r in population(N):
        batch.append(fhir_repo.Write(r["resourceType"], r["id"], r, None, "PUT"))
        if len(batch) == 500:
            async with db.write() as conn:
                await fhir_repo.apply_writes(conn, batch)
            batch = []
    if batch:
        async with db.write() as conn:
            await fhir_repo.apply_writes(conn, batch)
    await db.analyze()


def _sql(stmt, conn) -> str:
    return str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))


async def _full_scans(conn, sql: str, sqlite: bool) -> list[str]:
    if sqlite:
        rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all()
        return [r[-1] for r in rows
                if ((m := re.match(r"SCAN (\w+)", r[-1])) and MAIN.match(m.group(1))) or WIDE.match(r[-1])]
    plan = (await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql)).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    out = []

    def walk(node: dict) -> None:
        if node.get("Node Type") == "Seq Scan" and MAIN.match(node.get("Relation Name", "")):
            out.append(f"Seq Scan on {node['Relation Name']}")
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan[0]["Plan"])
    return out


async def test_every_parameter_type_uses_an_index(db_url):
    db = Database(db_url)
    try:
        await migrate(db)
        await _load(db)
        async with db.read() as conn:
            profiles = sorted({p for (p,) in await conn.execute(select(s.cm_patient.c.consent_profile)) if p})
        assert len(profiles) >= 3
        scopes = {"unrestricted": AccessScope(),
                  "research": AccessScope(unrestricted=False, allowed_profiles=frozenset(profiles[:2]))}
        failures = []
        async with db.read() as conn:
            if not db.is_sqlite:
                await conn.exec_driver_sql("SET enable_seqscan = off")
            for label, rtype, pairs in SEARCHES:
                for scope_name, scope in scopes.items():
                    q = parse_search(rtype, pairs + [("_count", "5")], default_count=50, max_count=1000)
                    if label.startswith("compartment"):
                        q.compartment = "sp3"
                    first = await fhir_repo.search(conn, q, scope)
                    assert first.matches, (label, scope_name)
                    stmts = [("first page", fhir_repo.page_statement(q, scope)[0]),
                             ("count", fhir_repo.count_statement(q, scope))]
                    if first.more:
                        q.after, q.position = first.last_key, len(first.matches)
                        stmts.append(("cursor page", fhir_repo.page_statement(q, scope)[0]))
                    for what, stmt in stmts:
                        scans = await _full_scans(conn, _sql(stmt, conn), db.is_sqlite)
                        if scans:
                            failures.append((label, scope_name, what, scans))
        assert not failures, "\n".join(map(str, failures))
    finally:
        await db.dispose()
