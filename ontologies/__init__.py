"""Consent logic for fedgate: the vendored GA4GH DUO release and a pure DUO evaluator.

DESIGN.md, "The consent gate — one place": ``ontologies`` evaluates, purely and with no I/O,
ConsentProfile × Purpose × Requester → Decision.  The DUO release is loaded with rdflib once at
start-up (:func:`load_duo`) and its closures are computed then; per-request work is dict/set lookups.

Public API (see ``docs/consent.md``)::

    from ontologies import load_duo, evaluate, ConsentProfile, ResearchPurpose, Requester
    duo = load_duo()                      # vendored duo.owl, cached
    decision = evaluate(profile, purpose, requester, duo, diseases, today)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name → submodule: imported on first use (PEP 562), so ``ontologies.evaluator`` / ``ontologies.terms``
#: (pure, used by FHIR Consent mapping and the CLI) do not pull in rdflib and the graph loaders (issue 27)
_LAZY = {
    "DecisionCache": "cache",
    "allowed_profile_ids": "cache",
    "allowed_profiles": "cache",
    "ClosureHierarchy": "diseases",
    "CompositeHierarchy": "diseases",
    "DiseaseHierarchy": "diseases",
    "EMPTY_HIERARCHY": "diseases",
    "load_hierarchy": "diseases",
    "load_obo_hierarchy": "diseases",
    "load_owl_hierarchy": "diseases",
    "request_supplied_hierarchy": "diseases",
    "DuoOntology": "duo_graph",
    "load_duo": "duo_graph",
    "ConsentParameters": "evaluator",
    "ConsentProfile": "evaluator",
    "Decision": "evaluator",
    "Requester": "evaluator",
    "ResearchPurpose": "evaluator",
    "evaluate": "evaluator",
    "normalize_curie": "terms",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ontologies' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ontologies.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from ontologies.cache import DecisionCache, allowed_profile_ids, allowed_profiles
    from ontologies.diseases import (
        EMPTY_HIERARCHY,
        ClosureHierarchy,
        CompositeHierarchy,
        DiseaseHierarchy,
        load_hierarchy,
        load_obo_hierarchy,
        load_owl_hierarchy,
        request_supplied_hierarchy,
    )
    from ontologies.duo_graph import DuoOntology, load_duo
    from ontologies.evaluator import ConsentParameters, ConsentProfile, Decision, Requester, ResearchPurpose, evaluate
    from ontologies.terms import normalize_curie

__all__ = [
    "ClosureHierarchy",
    "CompositeHierarchy",
    "ConsentParameters",
    "ConsentProfile",
    "Decision",
    "DecisionCache",
    "DiseaseHierarchy",
    "DuoOntology",
    "EMPTY_HIERARCHY",
    "Requester",
    "ResearchPurpose",
    "allowed_profile_ids",
    "allowed_profiles",
    "evaluate",
    "load_duo",
    "load_hierarchy",
    "load_obo_hierarchy",
    "load_owl_hierarchy",
    "normalize_curie",
    "request_supplied_hierarchy",
]
