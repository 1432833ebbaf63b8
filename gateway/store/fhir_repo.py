"""FHIR resource persistence: versions, history, the search index and the common-model projection.

The FHIR store's one import for services (``from gateway.store import fhir_repo as repo``); the code lives in
three modules, by what a change touches:

- :mod:`gateway.store.fhir_reads` — :class:`Stored`, :class:`Write`, current versions, single versions,
  history, patient links of resources being written;
- :mod:`gateway.store.fhir_writes` — :func:`apply_writes` (versions, history, only the index and common-model
  rows that changed), the writers' advisory locks, :func:`reindex` and :func:`relink`;
- :mod:`gateway.store.fhir_search` — search execution (:func:`search`, the statements it runs).

All writes of one interaction (or one whole transaction Bundle) go through :func:`apply_writes` on a
connection from :meth:`Database.write`, so they commit or roll back together.
"""

from __future__ import annotations

from gateway.store.fhir_reads import (
    H,
    R,
    Stored,
    Write,
    get_current,
    get_current_many,
    get_many,
    get_version,
    get_visible,
    history,
    links_of,
    referenced,
    resolve_identifiers,
    visible_types,
)
from gateway.store.fhir_search import (
    SearchResult,
    clause_has_modifier,
    clause_sql,
    compartment_clause,
    compartment_terms,
    count_statement,
    keyset_after,
    keyset_width,
    page_statement,
    search,
)
from gateway.store.fhir_writes import (
    CONDITION_LOCK_CLASS,
    RESOURCE_LOCK_CLASS,
    VersionConflict,
    apply_writes,
    lock_conditions,
    lock_resources,
    reindex,
    relink,
)

__all__ = [
    "CONDITION_LOCK_CLASS", "H", "R", "RESOURCE_LOCK_CLASS", "SearchResult", "Stored", "VersionConflict", "Write",
    "apply_writes", "clause_has_modifier", "clause_sql", "compartment_clause", "compartment_terms",
    "count_statement", "get_current", "get_current_many", "get_many", "get_version", "get_visible", "history",
    "keyset_after", "keyset_width", "links_of", "lock_conditions", "lock_resources", "page_statement", "referenced",
    "reindex", "relink", "resolve_identifiers", "search", "visible_types",
]
