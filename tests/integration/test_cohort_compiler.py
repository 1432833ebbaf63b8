"""The cohort compiler on both engines: every example cohort returns exactly the patients the
independent Python oracle finds in the generated rows, with and without a consent scope."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.services.federation_synth import DEMO_SITES, generate, load, profile_keys
from gateway.store.db import Database
from gateway.store.migrate import migrate
from gateway.store.scope import UNRESTRICTED, AccessScope
from gateway.store.cohort import compile_cohort
from mappings.cohort import parse
from gateway.vocab_cli import load_demo
from tests.integration.federation_ref import COHORTS, Oracle
from tests.vocab_ref import expand_codes

TODAY = dt.date(2025, 1, 1)


@pytest.fixture
async def store(db_url):
    db = Database(db_url)
    await migrate(db)
    rows = generate(DEMO_SITES[1], 300, seed=3)
    await load(db, rows)
    await load_demo(db)  # the code hierarchies `descendants` reads
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
        for sc, allowed in ((UNRESTRICTED, None), (scope, allowed_keys)):
            async with db.read() as conn:
                got = {r[0] for r in (await conn.execute(compile_cohort(node, sc, today=TODAY))).all()}
            assert got == oracle.cohort(doc, allowed), (name, allowed)
            nonempty += bool(got)
    assert nonempty >= len(COHORTS)  # the examples are not vacuous


async def test_descendants_read_the_vocabulary_store(store):
    db, rows = store
    node = parse(COHORTS["diabetes_desc"])
    plain = parse({k: {**v, "descendants": False} for k, v in COHORTS["diabetes_desc"].items()})
    async with db.read() as conn:
        with_ = (await conn.execute(compile_cohort(node, UNRESTRICTED))).all()
        without = (await conn.execute(compile_cohort(plain, UNRESTRICTED))).all()
    assert not without and with_
