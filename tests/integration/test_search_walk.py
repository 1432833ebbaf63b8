"""Range searches page in their index's order (issue 27: ``fhir_search._walk``): ``_lastUpdated`` by
(lu_ts, rid), a date by (hi or lo, rid), a quantity by (value, rid).  Walking every page from the keyset of
the last must give every match exactly once — the same set as the rid-order lookup of one big page
(``storage_order``, the other code path) — also for resources with several matching values of the walked
parameter (some repeated), in both consent scopes, and when resources are written between pages."""

from __future__ import annotations

from sqlalchemy import select, text

from gateway.store import fhir_repo
from gateway.store import schema as s
from gateway.store.db import Database
from gateway.store.migrate import migrate
from gateway.store.scope import AccessScope
from mappings.fhir.search import parse_search
from tests.fhir_population import patient_resources

PATIENTS = 24  # 1,200 resources, 816 Observations
SEARCHES = [
    [("value-quantity", "gt100")],
    [("value-quantity", "le60")],
    [("value-quantity", "ge150")],
    [("value-quantity", "gt100"), ("code", "8302-2")],  # the token drives: rid order, quantity probe
    [("date", "ge2018-03-01")],
    [("date", "gt2017-01-01"), ("status", "final")],
    [("date", "lt2016-06-01")],
    [("date", "eq2019")],
    [("date", "sa2016-01-01")],
    [("_lastUpdated", "gt2000-01-01")],
    [("_lastUpdated", "gt2000-01-01"), ("code", "8867-4")],
]


async def _write(db: Database, resources: list[dict]) -> None:
    async with db.write() as conn:
        prev = [await fhir_repo.get_current(conn, r["resourceType"], r["id"]) for r in resources]
        await fhir_repo.apply_writes(conn, [fhir_repo.Write(r["resourceType"], r["id"], r, p, "PUT")
                                            for r, p in zip(resources, prev)])


async def _setup(db_url: str) -> tuple[Database, dict[str, AccessScope]]:
    db = Database(db_url)
    await migrate(db)
    for i in range(0, PATIENTS, 4):  # several transactions: _lastUpdated ties within each, not across
        await _write(db, [r for p in range(i, i + 4) for r in patient_resources(p)])
    async with db.write() as conn:
        # several values of the walked parameter on some resources: a larger one, and the same one again
        q, d = s.idx_quantity, s.idx_date
        await conn.execute(text(
            "INSERT INTO idx_quantity (rid, res_type, param, value, system, code, consent_no) "
            "SELECT rid, res_type, param, value + 500, system, code, consent_no FROM idx_quantity WHERE rid % 7 = 0"))
        await conn.execute(text(
            "INSERT INTO idx_quantity (rid, res_type, param, value, system, code, consent_no) "
            "SELECT rid, res_type, param, value, system, code, consent_no FROM idx_quantity WHERE rid % 5 = 0"))
        await conn.execute(text(
            "INSERT INTO idx_date (rid, res_type, param, lo, hi, consent_no) "
            "SELECT rid, res_type, param, lo - 86400 * 700, hi + 86400 * 400, consent_no FROM idx_date "
            "WHERE rid % 3 = 0"))
        await conn.execute(text(
            "INSERT INTO idx_date (rid, res_type, param, lo, hi, consent_no) "
            "SELECT rid, res_type, param, lo, hi, consent_no FROM idx_date WHERE rid % 4 = 0"))
        assert (await conn.execute(select(q.c.rid).where(q.c.rid % 35 == 0).limit(1))).first()
        assert (await conn.execute(select(d.c.rid).where(d.c.rid % 12 == 0).limit(1))).first()
    await db.analyze()
    async with db.read() as conn:
        profiles = sorted({p for (p,) in await conn.execute(select(s.cm_patient.c.consent_profile)) if p})
    assert len(profiles) >= 3
    return db, {"treatment": AccessScope(),
                "research": AccessScope(unrestricted=False, allowed_profiles=frozenset(profiles[:2]))}


def _query(pairs, count: int):
    return parse_search("Observation", pairs + [("_count", str(count))], default_count=50, max_count=5000)


async def _everything(db: Database, pairs, scope) -> list[str]:
    q = _query(pairs, 5000)
    q.storage_order = True  # rid order: the index lookup as one rid set, not the walk
    async with db.read() as conn:
        res = await fhir_repo.search(conn, q, scope)
    assert not res.more
    return [m.res_id for m in res.matches]


async def _walk(db: Database, pairs, scope, between=None) -> tuple[list[str], list[tuple]]:
    q, got, keys, n = _query(pairs, 7), [], [], 0
    while True:
        async with db.read() as conn:
            res = await fhir_repo.search(conn, q, scope)
        got += [m.res_id for m in res.matches]
        if res.last_key is not None:
            assert len(res.last_key) == fhir_repo.keyset_width(q)
            keys.append(res.last_key)
        if not res.more:
            return got, keys
        q.after, q.position, n = res.last_key, q.position + len(res.matches), n + 1
        if between is not None and n == 3:
            await between()


async def test_every_page_walked_gives_every_match_once(db_url):
    db, scopes = await _setup(db_url)
    try:
        for pairs in SEARCHES:
            for name, scope in scopes.items():
                want = await _everything(db, pairs, scope)
                got, keys = await _walk(db, pairs, scope)
                assert len(want) > 14, (pairs, name)  # several pages
                assert len(got) == len(set(got)), (pairs, name, "repeated")
                assert sorted(got) == sorted(want), (pairs, name)
                assert keys == sorted(keys) and len(set(keys)) == len(keys), (pairs, name)  # keyset ascending
        # research sees fewer: the gate is in the walk
        assert len(await _everything(db, SEARCHES[0], scopes["research"])) < len(
            await _everything(db, SEARCHES[0], scopes["treatment"]))
    finally:
        await db.dispose()


async def test_writes_between_pages_lose_and_repeat_no_untouched_match(db_url):
    db, scopes = await _setup(db_url)
    try:
        for pairs in ([("value-quantity", "gt100")], [("date", "ge2018-03-01")], [("_lastUpdated", "gt2000-01-01")]):
            before = set(await _everything(db, pairs, scopes["treatment"]))
            touched: set[str] = set()

            async def between():
                # a new patient's resources (new rids, the newest lu_ts) and updates of two observations
                new = patient_resources(PATIENTS + len(touched))
                first, last = sorted(before)[0], sorted(before)[-1]
                olds = [r for r in patient_resources(int(first[1:].split("-")[0])) if r["id"] == first]
                olds += [r for r in patient_resources(int(last[1:].split("-")[0])) if r["id"] == last]
                for r in olds:
                    r["status"] = "amended"
                await _write(db, new + olds)
                touched.update(r["id"] for r in new + olds)

            got, _ = await _walk(db, pairs, scopes["treatment"], between)
            untouched = [i for i in got if i not in touched]
            assert len(untouched) == len(set(untouched)), pairs
            assert set(untouched) == before - touched, pairs
            assert set(await _everything(db, pairs, scopes["treatment"])) - set(got) <= touched, pairs
    finally:
        await db.dispose()
