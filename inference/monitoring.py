"""Model monitoring statistics (pure): drift (PSI) and running performance (AUROC, sensitivity).

PSI (population stability index) of a current sample against a reference sample: both are binned into
``bins`` equal-width bins spanning the pooled range; with p/q the bin shares (empty bins count as
``EPS``), PSI = Σ (q − p) · ln(q / p). Common reading: < 0.1 stable, 0.1–0.2 moderate, > 0.2 drift.

AUROC is the Mann–Whitney probability that a random positive scores above a random negative (ties ½).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

EPS = 1e-4


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float | None:
    if not reference or not current:
        return None
    lo = min(min(reference), min(current))
    hi = max(max(reference), max(current))
    if hi <= lo:
        return 0.0
    width = (hi - lo) / bins

    def shares(values: Sequence[float]) -> list[float]:
        counts = [0] * bins
        for v in values:
            counts[min(bins - 1, int((v - lo) / width))] += 1
        return [max(c / len(values), EPS) for c in counts]

    p, q = shares(reference), shares(current)
    return sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q))


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    pos = sorted(s for l, s in zip(labels, scores) if l)
    neg = sorted(s for l, s in zip(labels, scores) if not l)
    if not pos or not neg:
        return None
    # rank-sum with average ranks for ties
    pooled = sorted((s, 1 if l else 0) for l, s in zip(labels, scores))
    ranks: list[float] = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, (_, is_pos) in zip(ranks, pooled) if is_pos)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def sensitivity_specificity(
    labels: Sequence[bool], scores: Sequence[float], threshold: float
) -> tuple[float | None, float | None]:
    tp = sum(1 for l, s in zip(labels, scores) if l and s >= threshold)
    fn = sum(1 for l, s in zip(labels, scores) if l and s < threshold)
    tn = sum(1 for l, s in zip(labels, scores) if not l and s < threshold)
    fp = sum(1 for l, s in zip(labels, scores) if not l and s >= threshold)
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    return sens, spec


def age_band(birth_year: int | None, year: int) -> str:
    if birth_year is None:
        return "unknown"
    age = year - birth_year
    lo = (age // 20) * 20
    return f"{lo}-{lo + 19}"


def group(rows: Iterable[dict[Any, Any]], key: str) -> dict[str, list[dict[Any, Any]]]:
    out: dict[str, list[dict[Any, Any]]] = {}
    for r in rows:
        out.setdefault(str(r.get(key) or "unknown"), []).append(r)
    return out
