"""Statistical disclosure control applied at each site before anything leaves it (pure).

The rule (docs/federation.md, "Disclosure control"):

1. **Threshold.** Every count below ``min_cell`` (default 5) — including 0 — is released as ``null``
   ("suppressed"), so "nobody" and "a few people" look the same.
2. **Cell-key rounding.** Every other count is rounded to a multiple of ``base`` (default 5), up or down
   at random with probability proportional to the distance (unbiased), where the "random" number is a
   *cell key*: the sum, modulo 2³², of a keyed hash (HMAC with a site secret) of every patient id in the
   cell.  The same set of patients therefore always gets the same released value — whichever query,
   breakdown or site-local ordering produced it — so repeating or rephrasing a query averages nothing
   away, and a total and a breakdown cell holding the same patients agree.  Two cells differing by one
   patient get unrelated keys, so the released difference is 0 or ``base`` (or a suppression), never 1.
3. **Complementary suppression.** A breakdown with exactly one suppressed non-empty cell has its next
   smallest cell suppressed too, so the suppressed cell cannot be recovered as total − Σ others.
4. **Statistics** over a numeric field are released only if ≥ ``min_cell`` patients contribute; the
   histogram uses site-fixed bins with each bin released by rules 1–2; mean and standard deviation are
   rounded to 3 significant digits; quantiles are interpolated from the *released* histogram only.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

_M = 2**32


@dataclass
class CellKeys:
    """Per-patient record keys (HMAC of the id with the site's secret), cached."""

    secret: bytes
    _cache: dict[str, int] = field(default_factory=dict)

    def key(self, patient_id: str) -> int:
        k = self._cache.get(patient_id)
        if k is None:
            k = int.from_bytes(hmac.new(self.secret, patient_id.encode(), hashlib.sha256).digest()[:4], "big")
            if len(self._cache) < 2_000_000:
                self._cache[patient_id] = k
        return k

    def cell_key(self, patient_ids: Iterable[str]) -> float:
        return (sum(self.key(p) for p in patient_ids) % _M) / _M


@dataclass(frozen=True)
class Disclosure:
    min_cell: int = 5
    base: int = 5

    def release(self, n: int, cell_key: float) -> int | None:
        """The released value of a cell holding ``n`` patients with cell key ``cell_key`` ∈ [0, 1)."""
        if n < self.min_cell:
            return None
        lower = (n // self.base) * self.base
        rem = n - lower
        out = lower + self.base if rem and cell_key < rem / self.base else lower
        floor = -(-self.min_cell // self.base) * self.base
        return max(out, floor)

    def cells(
        self, groups: Mapping[str, Sequence[str]], keys: CellKeys, *, fixed: Sequence[str] = ()
    ) -> dict[str, int | None]:
        """Release a breakdown: ``groups`` maps category → patient ids.  ``fixed`` categories are always
        listed (null when suppressed); other categories below the threshold are pooled into ``"other"``."""
        out: dict[str, int | None] = {}
        pooled: list[str] = []
        raw: dict[str, int] = {}
        for cat in fixed:
            ids = groups.get(cat, ())
            raw[cat] = len(ids)
            out[cat] = self.release(len(ids), keys.cell_key(ids))
        for cat, ids in sorted(groups.items()):
            if cat in fixed:
                continue
            if len(ids) >= self.min_cell:
                raw[cat] = len(ids)
                out[cat] = self.release(len(ids), keys.cell_key(ids))
            else:
                pooled.extend(ids)
        if pooled:
            raw["other"] = len(pooled)
            out["other"] = self.release(len(pooled), keys.cell_key(pooled))
        # complementary suppression: never exactly one suppressed non-empty cell
        hidden = [c for c, v in out.items() if v is None and raw.get(c, 0) > 0]
        if len(hidden) == 1:
            shown = sorted((v, c) for c, v in out.items() if v is not None)
            if shown:
                out[shown[0][1]] = None
        return out


def sig3(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return round(x, 2 - int(math.floor(math.log10(abs(x)))))


def histogram_edges(field_name: str, configured: Mapping[str, Sequence[float]] | None = None) -> list[float]:
    """Site-fixed bin edges for a numeric field (configuration first, then built-in defaults)."""
    if configured and field_name in configured:
        return [float(x) for x in configured[field_name]]
    if field_name == "age":
        return [float(x) for x in range(0, 101, 10)]
    if field_name == "birth_year":
        return [float(x) for x in range(1900, 2031, 10)]
    if field_name == "slice_thickness":
        return [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 10.0]
    return [0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 10000.0]


def bin_labels(edges: Sequence[float]) -> list[str]:
    def f(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    return [f"<{f(edges[0])}"] + [f"[{f(a)},{f(b)})" for a, b in zip(edges, edges[1:])] + [f">={f(edges[-1])}"]


def bin_index(value: float, edges: Sequence[float]) -> int:
    if value < edges[0]:
        return 0
    for i in range(len(edges) - 1):
        if value < edges[i + 1]:
            return i + 1
    return len(edges)


def quantiles_from_histogram(
    counts: Sequence[int | None], edges: Sequence[float], qs: Sequence[float] = (0.25, 0.5, 0.75)
) -> dict[str, float | None]:
    """Quantiles by linear interpolation over the *released* histogram (suppressed bins count 0; the
    open-ended outer bins are treated as points at their edge)."""
    c = [v or 0 for v in counts]
    total = sum(c)
    out: dict[str, float | None] = {}
    for q in qs:
        key = f"p{int(round(q * 100))}"
        if total == 0:
            out[key] = None
            continue
        target = q * total
        acc = 0.0
        val = None
        for i, n in enumerate(c):
            if n and acc + n >= target:
                if i == 0:
                    val = edges[0]
                elif i == len(c) - 1:
                    val = edges[-1]
                else:
                    lo, hi = edges[i - 1], edges[i]
                    val = lo + (hi - lo) * (target - acc) / n
                break
            acc += n
        out[key] = sig3(val)
    return out


def merge_moments(parts: Sequence[tuple[int, float, float]]) -> tuple[int, float | None, float | None]:
    """Pooled (count, mean, std) from per-site (count, mean, std) triples (population std)."""
    n = sum(p[0] for p in parts)
    if n == 0:
        return 0, None, None
    mean = sum(p[0] * p[1] for p in parts) / n
    var = sum(p[0] * (p[2] ** 2 + (p[1] - mean) ** 2) for p in parts) / n
    return n, mean, math.sqrt(max(var, 0.0))


__all__ = [
    "CellKeys",
    "Disclosure",
    "histogram_edges",
    "bin_labels",
    "bin_index",
    "quantiles_from_histogram",
    "merge_moments",
    "sig3",
]
