"""Decision caching and the "allowed profiles" set the store turns into a WHERE clause.

DESIGN.md, "The consent gate — one place", step 3: "Results are cached per (profile, purpose,
requester attributes): the number of distinct profiles is small, so enforcement becomes a set of
allowed profile ids that the store turns into a WHERE clause."

The cache key is ``(profile.key(), purpose.key(), requester.key(), today)``; ``today`` is part of
the key because TS and MOR depend on the date, so a cached decision never outlives its day.  The
ontology and disease hierarchy are fixed per cache instance (they are loaded once at start-up).
A cache instance belongs to whoever creates it (the app state), never to a module global.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import date

from ontologies.diseases import DiseaseHierarchy
from ontologies.duo_graph import DuoOntology
from ontologies.evaluator import ConsentProfile, Decision, Requester, ResearchPurpose, evaluate

__all__ = ["DecisionCache", "allowed_profiles", "allowed_profile_ids"]

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, str, date]


class DecisionCache:
    """A small LRU of :class:`~ontologies.evaluator.Decision` for one ontology + disease hierarchy.

    Not thread-safe by design: the gateway evaluates on its event loop (the work is a few dict
    lookups).  ``maxsize`` bounds memory; :attr:`hits` / :attr:`misses` are for metrics.
    """

    def __init__(self, ontology: DuoOntology, diseases: DiseaseHierarchy, *, maxsize: int = 4096) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.ontology = ontology
        self.diseases = diseases
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, Decision] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every decision (e.g. after reloading ontologies)."""
        self._entries.clear()

    def decide(
        self,
        profile: ConsentProfile,
        purpose: ResearchPurpose,
        requester: Requester,
        today: date,
    ) -> Decision:
        """Return the cached decision, evaluating (purely) on a miss."""
        key: CacheKey = (profile.key(), purpose.key(), requester.key(), today)
        found = self._entries.get(key)
        if found is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return found
        self.misses += 1
        decision = evaluate(profile, purpose, requester, self.ontology, self.diseases, today)
        self._entries[key] = decision
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return decision


def _decide(
    profile: ConsentProfile,
    purpose: ResearchPurpose,
    requester: Requester,
    today: date,
    ontology: DuoOntology | None,
    diseases: DiseaseHierarchy | None,
    cache: DecisionCache | None,
) -> Decision:
    if cache is not None:
        return cache.decide(profile, purpose, requester, today)
    if ontology is None or diseases is None:
        raise TypeError("pass either cache= or both ontology= and diseases=")
    return evaluate(profile, purpose, requester, ontology, diseases, today)


def allowed_profiles(
    profiles: Iterable[ConsentProfile],
    purpose: ResearchPurpose,
    requester: Requester,
    *,
    today: date,
    ontology: DuoOntology | None = None,
    diseases: DiseaseHierarchy | None = None,
    cache: DecisionCache | None = None,
) -> frozenset[str]:
    """Keys (:meth:`ConsentProfile.key`) of the profiles whose decision is ``permit``.

    Indeterminate and deny are both excluded (fail closed).  Give ``cache=`` (preferred in the
    gateway) or ``ontology=`` and ``diseases=``.
    """
    return frozenset(
        profile.key()
        for profile in profiles
        if _decide(profile, purpose, requester, today, ontology, diseases, cache).permitted
    )


def allowed_profile_ids(
    profiles_by_id: Mapping[str, ConsentProfile],
    purpose: ResearchPurpose,
    requester: Requester,
    *,
    today: date,
    ontology: DuoOntology | None = None,
    diseases: DiseaseHierarchy | None = None,
    cache: DecisionCache | None = None,
) -> frozenset[str]:
    """Like :func:`allowed_profiles` for profiles stored under ids of the caller's choosing."""
    return frozenset(
        profile_id
        for profile_id, profile in profiles_by_id.items()
        if _decide(profile, purpose, requester, today, ontology, diseases, cache).permitted
    )
