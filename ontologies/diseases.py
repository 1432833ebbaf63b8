"""Pluggable disease hierarchies for DS (DUO:0000007) matching.

DUO.md, "DS DUO:0000007 + disease class(es) D": a request for disease X is permitted iff X ≡ D or X is
a subclass of D in MONDO.  The evaluator only needs one question answered: *what are the superclasses
of X?*  That is the :class:`DiseaseHierarchy` protocol.  ``ancestors(x)`` returns ``None`` when the
hierarchy does not know ``x`` at all: unknown disease codes fail closed.

Implementations:

* :class:`ClosureHierarchy`: a precomputed ``curie -> frozenset(ancestors)`` table; everything else
  builds one.
* :func:`load_obo_hierarchy`: an OBO 1.4 flat file (``[Term]`` stanzas, ``is_a`` lines), parsed here.
  Preferred for MONDO (``mondo.obo``): fast, no rdflib.
* :func:`load_owl_hierarchy`: an OWL file (RDF/XML) via rdflib, ``rdfs:subClassOf`` closure.
* :func:`request_supplied_hierarchy`: the ``disease_ancestors`` map of the ``fedgate consent
  evaluate`` input (trusted only as far as its caller is; the gateway uses configured ontologies).
* :class:`CompositeHierarchy`: several of the above; the first one that knows a code answers.

Obsolete classes (``is_obsolete: true`` / ``owl:deprecated true`` / ``ObsoleteClass``) are excluded:
they are unknown, and they never appear as ancestors.  OBO ``alt_id`` and ``replaced_by`` are *not*
followed (an alternative id is unknown and fails closed; map it first).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import rdflib

from ontologies.duo_graph import read_class_graph, transitive_closure
from ontologies.terms import TermError, normalize_curie

__all__ = [
    "DiseaseHierarchy",
    "ClosureHierarchy",
    "CompositeHierarchy",
    "EMPTY_HIERARCHY",
    "OboParseError",
    "parse_obo",
    "load_obo_hierarchy",
    "load_owl_hierarchy",
    "load_hierarchy",
    "request_supplied_hierarchy",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class DiseaseHierarchy(Protocol):
    """Source of disease superclasses (DUO.md, "DS DUO:0000007").

    ``ancestors(curie)`` returns the *strict* transitive superclasses of ``curie`` (not ``curie``
    itself), or ``None`` when the code is unknown to this hierarchy.  ``curie`` is already
    normalised (:func:`ontologies.terms.normalize_curie`).
    """

    def ancestors(self, curie: str) -> frozenset[str] | None:
        """Strict superclasses of ``curie``, or ``None`` if unknown."""
        ...


@dataclass(frozen=True, eq=False)
class ClosureHierarchy:
    """A hierarchy given by its precomputed ancestor closure (immutable, dict lookups only)."""

    closure: Mapping[str, frozenset[str]]
    source: str = "<memory>"

    def ancestors(self, curie: str) -> frozenset[str] | None:
        """Strict superclasses of ``curie``, or ``None`` if unknown."""
        return self.closure.get(curie)

    def __len__(self) -> int:
        return len(self.closure)

    @classmethod
    def from_parents(
        cls,
        parents: Mapping[str, Iterable[str]],
        *,
        known: Iterable[str] | None = None,
        obsolete: Iterable[str] = (),
        source: str = "<memory>",
    ) -> ClosureHierarchy:
        """Build from direct ``child -> parents`` edges.

        ``known`` limits which codes the hierarchy answers for (default: every code that occurs,
        as a child or a parent).  ``obsolete`` codes are dropped entirely: they are unknown and
        are removed from every ancestor set.
        """
        dead = frozenset(obsolete)
        closure = transitive_closure(parents)
        members = set(closure) if known is None else set(known)
        table = {
            code: frozenset(a for a in closure.get(code, frozenset()) if a not in dead)
            for code in members
            if code not in dead
        }
        return cls(closure=MappingProxyType(table), source=source)


#: A hierarchy that knows nothing: DS matching falls back to exact equality only.
EMPTY_HIERARCHY = ClosureHierarchy(closure=MappingProxyType({}), source="<empty>")


@dataclass(frozen=True)
class CompositeHierarchy:
    """Several hierarchies in precedence order: the first that knows a code answers for it.

    First-match (not union) keeps a configured ontology authoritative over request-supplied ancestor
    sets: a caller cannot widen the ancestors of a code that the configured ontology knows.
    """

    parts: tuple[DiseaseHierarchy, ...]

    def ancestors(self, curie: str) -> frozenset[str] | None:
        """Strict superclasses of ``curie`` from the first part that knows it, or ``None``."""
        for part in self.parts:
            found = part.ancestors(curie)
            if found is not None:
                return found
        return None


def request_supplied_hierarchy(mapping: Mapping[str, Iterable[str]]) -> ClosureHierarchy:
    """Hierarchy from a ``{disease: [ancestor, ...]}`` map (the CLI's ``disease_ancestors``).

    Keys and values are normalised (CURIE or OBO IRI accepted).  The closure is taken transitively
    over the map, but only the map's *keys* are known: a code that only appears as an ancestor is
    unknown (fails closed) unless it is also a key.

    :raises TermError: a key or value is not a string / is blank.
    :raises TypeError: a value is not a list of strings.
    """
    parents: dict[str, set[str]] = {}
    for key, values in mapping.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"disease_ancestors[{key!r}] must be a list of CURIEs")
        child = normalize_curie(key)
        parents.setdefault(child, set()).update(normalize_curie(v) for v in values)
        parents[child].discard(child)
    return ClosureHierarchy.from_parents(parents, known=parents.keys(), source="<request>")


class OboParseError(ValueError):
    """An OBO file that cannot be read as ``[Term]`` stanzas (message names file and line)."""


def parse_obo(lines: Iterable[str], *, source: str = "<obo>") -> tuple[dict[str, set[str]], set[str]]:
    """Parse OBO 1.4 ``[Term]`` stanzas: returns (``id -> is_a parents``, obsolete ids).

    Only ``id:``, ``is_a:`` and ``is_obsolete:`` are read; ``[Typedef]``/``[Instance]`` stanzas,
    qualifiers (``{...}``) and comments (``! ...``) are skipped.  ``relationship:`` lines
    (e.g. part_of) are not subsumption and are ignored.
    """
    parents: dict[str, set[str]] = {}
    obsolete: set[str] = set()
    in_term = False
    current: str | None = None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("!"):
            continue
        if line.startswith("["):
            in_term = line == "[Term]"
            current = None
            continue
        if not in_term:
            continue
        tag, sep, value = line.partition(":")
        if not sep:
            raise OboParseError(f"{source}:{number}: expected 'tag: value', got {line!r}")
        tag = tag.strip()
        value = value.split("!", 1)[0].split("{", 1)[0].strip()
        if tag == "id":
            try:
                current = normalize_curie(value)
            except TermError as err:
                raise OboParseError(f"{source}:{number}: bad id: {err}") from err
            parents.setdefault(current, set())
        elif current is None:
            raise OboParseError(f"{source}:{number}: {tag!r} before the stanza's id")
        elif tag == "is_a":
            token = value.split()[0] if value else ""
            try:
                parents[current].add(normalize_curie(token))
            except TermError as err:
                raise OboParseError(f"{source}:{number}: bad is_a: {err}") from err
        elif tag == "is_obsolete" and value.lower() == "true":
            obsolete.add(current)
    return parents, obsolete


def load_obo_hierarchy(path: str | os.PathLike[str]) -> ClosureHierarchy:
    """Load an OBO file (e.g. ``mondo.obo``) into a :class:`ClosureHierarchy`; cached per path.

    Known codes are the non-obsolete ``[Term]`` ids; obsolete ones are unknown.

    :raises OSError: unreadable file.  :raises OboParseError: malformed stanza.
    """
    return _load_obo_cached(str(Path(path).resolve()))


@functools.lru_cache(maxsize=8)
def _load_obo_cached(path: str) -> ClosureHierarchy:
    started = time.perf_counter()
    with open(path, encoding="utf-8") as handle:
        parents, obsolete = parse_obo(handle, source=path)
    hierarchy = ClosureHierarchy.from_parents(parents, known=parents.keys(), obsolete=obsolete, source=path)
    logger.info(
        "loaded OBO hierarchy %s: %d terms (%d obsolete excluded) in %.3f s",
        path,
        len(hierarchy),
        len(obsolete),
        time.perf_counter() - started,
    )
    return hierarchy


def load_owl_hierarchy(path: str | os.PathLike[str], *, rdf_format: str | None = None) -> ClosureHierarchy:
    """Load an OWL file with rdflib into a :class:`ClosureHierarchy`; cached per path.

    Classes are keyed on ``oboInOwl:id`` when present (else the IRI's CURIE); only named
    ``rdfs:subClassOf`` edges count; deprecated / ObsoleteClass classes are excluded.  rdflib on
    a full MONDO OWL is slow (minutes); prefer :func:`load_obo_hierarchy` for large ontologies.

    :raises OSError: unreadable file.  :raises xml.sax.SAXParseException: not RDF/XML.
    """
    return _load_owl_cached(str(Path(path).resolve()), rdf_format or "xml")


@functools.lru_cache(maxsize=8)
def _load_owl_cached(path: str, rdf_format: str) -> ClosureHierarchy:
    started = time.perf_counter()
    graph = rdflib.Graph()
    graph.parse(path, format=rdf_format)
    cg = read_class_graph(graph)
    known = cg.classes | frozenset(cg.parents)
    hierarchy = ClosureHierarchy.from_parents(cg.parents, known=known, obsolete=cg.obsolete, source=path)
    logger.info(
        "loaded OWL hierarchy %s: %d classes (%d obsolete excluded) in %.3f s",
        path,
        len(hierarchy),
        len(cg.obsolete),
        time.perf_counter() - started,
    )
    return hierarchy


def load_hierarchy(path: str | os.PathLike[str]) -> ClosureHierarchy:
    """Load by file extension: ``.obo`` → :func:`load_obo_hierarchy`, ``.ttl`` → Turtle, else RDF/XML OWL."""
    suffix = Path(path).suffix.lower()
    if suffix == ".obo":
        return load_obo_hierarchy(path)
    if suffix == ".ttl":
        return load_owl_hierarchy(path, rdf_format="turtle")
    return load_owl_hierarchy(path)
