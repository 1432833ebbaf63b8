"""The cohort compiler on both engines: every example cohort returns exactly the patients the
independent Python oracle finds in the generated rows, with and without a consent scope."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.services.federation_synth import DEMO_SITES, expand_codes, generate, load, profile_keys
from gateway.store.db import Database
from gateway.store.migrate import migrate
from gateway.store.scope import AccessScope
from mappings.cohort import compile_cohort, parse
from tests.integration.federation_ref import COHORTS, Oracle

TODAY = dt.date(2025, 1, 1)


@pytest.fixture
async def store(db_url):
    db = Database(db_url)
    await migrate(db)
    rows = generate(DEMO_SITES[1], 300, seed=3)
    await load(db, rows)
    try:
        yield db, rows
    finally:
        await db.dispose()


async def test_every_example_matches_the_oracle(store):
    db, rows = store
    oracle = Oracle(rows, expand_codes, TODAY)
    keys = profile_keys()
    allowed_keys = {keys["GRU"], keys["DS-CVD"]}
    scope = AccessScope(False, frozenset(allowed_keys), "test")
    nonempty = 0
    for name, doc in COHORTS.items():
        node = parse(doc)
        for sc, allowed in ((None, None), (scope, allowed_keys)):
            async with db.read() as conn:
                got = {r[0] for r in (await conn.execute(compile_cohort(node, sc, expand=expand_codes, today=TODAY))).all()}
            assert got == oracle.cohort(doc, allowed), (name, allowed)
            nonempty += bool(got)
    assert nonempty >= len(COHORTS)  # the examples are not vacuous


async def test_descendants_need_the_expander(store):
    db, rows = store
    node = parse(COHORTS["diabetes_desc"])
    async with db.read() as conn:
        without = (await conn.execute(compile_cohort(node))).all()
        with_ = (await conn.execute(compile_cohort(node, expand=expand_codes))).all()
    assert not without and with_
