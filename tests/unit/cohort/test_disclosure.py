"""Disclosure control: thresholds, cell-key rounding, complementary suppression, histogram quantiles."""

from __future__ import annotations

import random

from mappings.cohort.disclosure import CellKeys, Disclosure, merge_moments, quantiles_from_histogram

KEYS = CellKeys(b"unit-test-secret")
D = Disclosure(5, 5)


def test_small_counts_and_zero_are_suppressed_alike():
    for n in range(5):
        ids = [f"p{i}" for i in range(n)]
        assert D.release(n, KEYS.cell_key(ids)) is None


def test_released_values_are_multiples_of_the_base_near_the_truth():
    rng = random.Random(1)
    for n in range(5, 400):
        ids = [f"p{rng.random()}" for _ in range(n)]
        v = D.release(n, KEYS.cell_key(ids))
        assert v % 5 == 0 and abs(v - n) < 5 and v >= 5


def test_same_patients_same_answer_and_one_patient_never_shows_as_one():
    ids = [f"p{i}" for i in range(123)]
    assert D.release(123, KEYS.cell_key(ids)) == D.release(123, KEYS.cell_key(list(reversed(ids))))
    diffs = set()
    for extra in range(200):
        a = ids + [f"x{extra}"]
        diffs.add(D.release(len(a), KEYS.cell_key(a)) - D.release(len(ids), KEYS.cell_key(ids)))
    assert diffs <= {-5, 0, 5}
    assert 0 in diffs and diffs & {-5, 5}  # the difference is noise, not the patient


def test_unbiased_on_average():
    rng = random.Random(2)
    n = 12
    vals = [D.release(n, KEYS.cell_key([f"q{rng.random()}" for _ in range(n)])) for _ in range(4000)]
    assert abs(sum(vals) / len(vals) - n) < 0.3


def test_breakdown_complementary_suppression_and_pooling():
    groups = {"female": [f"f{i}" for i in range(40)], "male": [f"m{i}" for i in range(30)], "other": ["o1"]}
    cells = D.cells(groups, KEYS, fixed=("female", "male", "other", "unknown"))
    assert cells["other"] is None and cells["unknown"] is None
    # only one non-empty cell was small → the next smallest is hidden too
    assert cells["male"] is None and cells["female"] is not None
    dyn = D.cells({"CT": [f"c{i}" for i in range(20)], "PT": ["a", "b"], "NM": ["c", "d", "e"], "MR": list("ghijklmn")}, KEYS)
    assert set(dyn) == {"CT", "MR", "other"}  # PT + NM pooled into "other" (5 patients)
    assert all(v is None or v >= 5 for v in dyn.values())


def test_quantiles_and_moments():
    edges = [0.0, 10.0, 20.0, 30.0]
    q = quantiles_from_histogram([None, 10, 10, None, None], edges)
    assert q["p50"] == 10.0 and q["p25"] == 5.0
    n, mean, std = merge_moments([(10, 1.0, 0.0), (10, 3.0, 0.0)])
    assert n == 20 and mean == 2.0 and abs(std - 1.0) < 1e-9
