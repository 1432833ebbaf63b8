"""Issue 20: FHIR mutation fuzzing in the suite — a fixed seed, a bounded number of mutants per engine.

Types, nesting, unicode, sizes, envelope and raw-text damage (tests/fhir_fuzz.py): no 5xx, every
refusal an OperationOutcome that leaves the store unchanged. ``FEDGATE_FHIR_FUZZ_N`` raises the count;
the larger run is bench/fhir_fuzz.py.
"""

from __future__ import annotations

import os

from tests.fhir_fuzz import mutants, run

SEED = int(os.environ.get("FEDGATE_FHIR_FUZZ_SEED", "20"))
N = int(os.environ.get("FEDGATE_FHIR_FUZZ_N", "120"))


async def test_fhir_mutants_never_500_and_refusals_store_nothing(gateway, http):
    items = mutants(SEED, N)
    out = await run(http, gateway.fhir, gateway.headers("ehr-system"), gateway.headers("admin"), items)
    assert not out["failures"], "\n".join(out["failures"][:30])
    assert out["refused"] > N // 3  # the mutants do exercise the refusals
    assert out["accepted"] + out["refused"] == N
