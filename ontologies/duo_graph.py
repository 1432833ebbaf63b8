"""Load the GA4GH Data Use Ontology with rdflib once and precompute its class closures.

DUO.md, "Class hierarchy": the permission terms sit under DUO:0000001, the modifiers under
DUO:0000017 and the research-purpose (investigation) terms under OBI:0000066.  The evaluator needs
"is X the request term or a descendant of it" questions answered per request; we answer them from
plain ``frozenset``/``dict`` lookups built here once, never from SPARQL or graph walks per request
(DESIGN.md, "Don't: SPARQL per request").

Quirks of the vendored 2021-02-23 release handled here (DUO.md, "Quirks to handle"):

1. The NPOA class IRI is misspelled ``.../DUO_00000044`` while its ``oboInOwl:id`` is
   ``DUO:0000044``.  Every class is keyed on its ``oboInOwl:id`` when it has one; the IRI-derived
   CURIE (``DUO:00000044``) is recorded as an alias, so both spellings resolve.
2. NPU/NCU are modelled as subclasses of NPUNCU.  The closures are reported as the file states them;
   it is the evaluator's job not to use subsumption for modifiers (:mod:`ontologies.evaluator`).
3. Obsolete classes (``owl:deprecated true`` or ``rdfs:subClassOf oboInOwl:ObsoleteClass``; in this
   release DUO:0000002/3/5/14) are collected in :attr:`DuoOntology.obsolete`; the evaluator treats
   them as unknown and fails closed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import rdflib
from rdflib import BNode, Literal, URIRef
from rdflib.namespace import OWL, RDF, RDFS

from ontologies.terms import TermError, normalize_curie

__all__ = [
    "OBO_IN_OWL",
    "DUO_PERMISSION_ROOT",
    "DUO_MODIFIER_ROOT",
    "INVESTIGATION_ROOT",
    "DuoTerm",
    "DuoOntology",
    "ClassGraph",
    "read_class_graph",
    "transitive_closure",
    "invert_closure",
    "build_duo_ontology",
    "load_duo",
    "default_duo_path",
]

logger = logging.getLogger(__name__)

OBO_IN_OWL = rdflib.Namespace("http://www.geneontology.org/formats/oboInOwl#")
_IS_RESTRICTED_TO = URIRef("http://purl.obolibrary.org/obo/DUO_0000010")
_OBSOLETE_CLASS = OBO_IN_OWL.ObsoleteClass

#: DUO.md, "Class hierarchy": root of the data use permissions.
DUO_PERMISSION_ROOT = "DUO:0000001"
#: DUO.md, "Class hierarchy": root of the data use modifiers.
DUO_MODIFIER_ROOT = "DUO:0000017"
#: DUO.md, "Class hierarchy": OBI "investigation", root of the research-purpose terms 31-40.
INVESTIGATION_ROOT = "OBI:0000066"


def transitive_closure(parents: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """Return the strict (irreflexive) ancestor set of every node of a ``child -> parents`` map.

    Nodes that only occur as parents get an entry too.  Cycles are tolerated (a node in a cycle
    has the other cycle members, and not itself, among its ancestors).  Iterative, so deep
    hierarchies (MONDO is ~20 levels, but hand-made ones may be deeper) cannot hit the recursion limit.
    """
    direct: dict[str, frozenset[str]] = {c: frozenset(p) for c, p in parents.items()}
    for ps in list(direct.values()):
        for p in ps:
            direct.setdefault(p, frozenset())
    closure: dict[str, frozenset[str]] = {}
    for start in direct:
        if start in closure:
            continue
        seen: set[str] = set()
        stack = list(direct[start])
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            done = closure.get(node)
            if done is not None:
                seen.update(done)
            else:
                stack.extend(direct[node])
        seen.discard(start)
        closure[start] = frozenset(seen)
    return closure


def invert_closure(ancestors: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Return the strict descendant set of every node from an ancestor closure."""
    desc: dict[str, set[str]] = {node: set() for node in ancestors}
    for node, ancs in ancestors.items():
        for anc in ancs:
            desc.setdefault(anc, set()).add(node)
    return {node: frozenset(d) for node, d in desc.items()}


@dataclass(frozen=True, slots=True)
class ClassGraph:
    """The class structure read from an OWL file: ids, direct parents, obsolete ids, annotations.

    Every mapping is keyed on the canonical CURIE: ``oboInOwl:id`` when the class has one, else the
    CURIE derived from the IRI (see :func:`ontologies.terms.normalize_curie`).
    """

    classes: frozenset[str]
    parents: Mapping[str, frozenset[str]]
    obsolete: frozenset[str]
    aliases: Mapping[str, str]
    labels: Mapping[str, str]
    shorthands: Mapping[str, str]
    iris: Mapping[str, str]
    restricted_to: Mapping[str, frozenset[str]]
    version_iri: str | None


def _literal_text(graph: rdflib.Graph, subject: URIRef, predicate: URIRef) -> str | None:
    """The English (or untagged, or first) literal value of ``subject predicate ?``."""
    values = [o for o in graph.objects(subject, predicate) if isinstance(o, Literal)]
    if not values:
        return None
    for lang in ("en", None):
        for value in values:
            if value.language == lang:
                return str(value)
    return str(values[0])


def read_class_graph(graph: rdflib.Graph) -> ClassGraph:
    """Read classes, ``rdfs:subClassOf`` edges between named classes and obsolescence from ``graph``.

    Anonymous superclasses (``owl:Restriction``) are not hierarchy edges; the ones on DUO's
    ``is restricted to`` property (DUO:0000010) are reported in :attr:`ClassGraph.restricted_to`
    (DUO.md: DS ⊑ is_restricted_to some MONDO:0000001, RS ... topic_0003, GS ... GAZ:00000448).
    """

    def iri_curie(node: URIRef) -> str:
        try:
            return normalize_curie(str(node))
        except TermError:  # pragma: no cover - rdflib never yields an empty IRI here
            return str(node)

    curie_of: dict[URIRef, str] = {}
    aliases: dict[str, str] = {}
    for subject, literal in graph.subject_objects(OBO_IN_OWL.id):
        if not isinstance(subject, URIRef) or not isinstance(literal, Literal):
            continue
        try:
            declared = normalize_curie(str(literal))
        except TermError:
            continue
        curie_of[subject] = declared
        derived = iri_curie(subject)
        if derived != declared:
            aliases[derived] = declared
            logger.debug("class IRI %s has oboInOwl:id %s; aliasing %s", subject, declared, derived)

    def curie(node: URIRef) -> str:
        found = curie_of.get(node)
        if found is None:
            found = curie_of[node] = iri_curie(node)
        return found

    classes: set[str] = set()
    iris: dict[str, str] = {}
    for subject in graph.subjects(RDF.type, OWL.Class):
        if isinstance(subject, URIRef):
            classes.add(curie(subject))
            iris[curie(subject)] = str(subject)

    parents: dict[str, set[str]] = {}
    restricted_to: dict[str, set[str]] = {}
    obsolete: set[str] = set()
    for subject, parent in graph.subject_objects(RDFS.subClassOf):
        if not isinstance(subject, URIRef):
            continue
        child = curie(subject)
        iris.setdefault(child, str(subject))
        if isinstance(parent, URIRef):
            if parent == _OBSOLETE_CLASS:
                obsolete.add(child)
            parents.setdefault(child, set()).add(curie(parent))
            classes.add(child)
        elif isinstance(parent, BNode):
            if graph.value(parent, OWL.onProperty) == _IS_RESTRICTED_TO:
                filler = graph.value(parent, OWL.someValuesFrom)
                if isinstance(filler, URIRef):
                    restricted_to.setdefault(child, set()).add(curie(filler))
    for subject, flag in graph.subject_objects(OWL.deprecated):
        if isinstance(subject, URIRef) and isinstance(flag, Literal) and flag.toPython() is True:
            obsolete.add(curie(subject))

    labels: dict[str, str] = {}
    shorthands: dict[str, str] = {}
    for node, name in curie_of.items():
        label = _literal_text(graph, node, RDFS.label)
        if label is not None:
            labels[name] = label
        short = _literal_text(graph, node, OBO_IN_OWL.shorthand)
        if short:
            shorthands[name] = short

    version = None
    for ontology in graph.subjects(RDF.type, OWL.Ontology):
        value = graph.value(ontology, OWL.versionIRI)
        if value is not None:
            version = str(value)
            break

    return ClassGraph(
        classes=frozenset(classes),
        parents=MappingProxyType({c: frozenset(p) for c, p in parents.items()}),
        obsolete=frozenset(obsolete),
        aliases=MappingProxyType(aliases),
        labels=MappingProxyType(labels),
        shorthands=MappingProxyType(shorthands),
        iris=MappingProxyType(iris),
        restricted_to=MappingProxyType({c: frozenset(v) for c, v in restricted_to.items()}),
        version_iri=version,
    )


@dataclass(frozen=True, slots=True)
class DuoTerm:
    """One DUO class as the evaluator sees it (DUO.md, "Class hierarchy")."""

    curie: str
    iri: str
    label: str | None
    shorthand: str | None
    obsolete: bool


@dataclass(frozen=True, eq=False)
class DuoOntology:
    """The loaded DUO release: terms, aliases and precomputed ``rdfs:subClassOf`` closures.

    Immutable after construction; every query is a dict or set lookup.  Build it with
    :func:`load_duo` (cached) or :func:`build_duo_ontology`.  Compared by identity.
    """

    source: str
    version_iri: str | None
    terms: Mapping[str, DuoTerm]
    aliases: Mapping[str, str]
    obsolete: frozenset[str]
    ancestor_map: Mapping[str, frozenset[str]]
    descendant_map: Mapping[str, frozenset[str]]
    restricted_to: Mapping[str, frozenset[str]]
    load_seconds: float = field(default=0.0)

    # -- identity -----------------------------------------------------------------------------

    def resolve(self, code: object) -> str | None:
        """Canonical CURIE for a term given as CURIE or IRI, or ``None`` when DUO does not know it.

        Obsolete terms *do* resolve (so that reasons can say "obsolete" rather than "unknown");
        callers must check :meth:`is_obsolete`.  The NPOA typo IRI resolves to ``DUO:0000044``.
        """
        try:
            curie = normalize_curie(code)
        except TermError:
            return None
        curie = self.aliases.get(curie, curie)
        return curie if curie in self.terms else None

    def is_obsolete(self, curie: str) -> bool:
        """True for deprecated / ObsoleteClass terms (DUO.md: DUO:0000002, 3, 5, 14)."""
        return curie in self.obsolete

    # -- hierarchy ------------------------------------------------------------------------------

    def ancestors(self, curie: str) -> frozenset[str]:
        """Strict superclasses of ``curie`` (empty for unknown terms)."""
        return self.ancestor_map.get(curie, frozenset())

    def descendants(self, curie: str) -> frozenset[str]:
        """Strict subclasses of ``curie`` (empty for unknown terms)."""
        return self.descendant_map.get(curie, frozenset())

    def is_a(self, curie: str, ancestor: str) -> bool:
        """Reflexive subsumption: ``curie`` is ``ancestor`` or one of its subclasses."""
        return curie == ancestor or ancestor in self.ancestor_map.get(curie, frozenset())

    def _live_descendants(self, root: str) -> frozenset[str]:
        return frozenset(c for c in self.descendants(root) if c not in self.obsolete)

    @property
    def permissions(self) -> frozenset[str]:
        """Non-obsolete data use permissions (subclasses of DUO:0000001)."""
        return self._live_descendants(DUO_PERMISSION_ROOT)

    @property
    def modifiers(self) -> frozenset[str]:
        """Non-obsolete data use modifiers (subclasses of DUO:0000017)."""
        return self._live_descendants(DUO_MODIFIER_ROOT)

    @property
    def investigations(self) -> frozenset[str]:
        """Non-obsolete research-purpose terms (subclasses of OBI:0000066)."""
        return self._live_descendants(INVESTIGATION_ROOT)

    # -- presentation ---------------------------------------------------------------------------

    def display(self, curie: str) -> str:
        """``"DUO:0000007 (DS)"``, or ``"DUO:0000040 (disease category research)"`` without shorthand."""
        term = self.terms.get(curie)
        if term is None:
            return curie
        name = term.shorthand or term.label
        return f"{curie} ({name})" if name else curie


def build_duo_ontology(graph: rdflib.Graph, *, source: str = "<graph>", load_seconds: float = 0.0) -> DuoOntology:
    """Compute the :class:`DuoOntology` (terms, aliases, closures) from a parsed rdflib graph."""
    cg = read_class_graph(graph)
    ancestors = transitive_closure(cg.parents)
    for cls in cg.classes:
        ancestors.setdefault(cls, frozenset())
    descendants = invert_closure(ancestors)
    terms = {
        curie: DuoTerm(
            curie=curie,
            iri=cg.iris.get(curie, curie),
            label=cg.labels.get(curie),
            shorthand=cg.shorthands.get(curie),
            obsolete=curie in cg.obsolete,
        )
        for curie in cg.classes
    }
    return DuoOntology(
        source=source,
        version_iri=cg.version_iri,
        terms=MappingProxyType(terms),
        aliases=cg.aliases,
        obsolete=cg.obsolete,
        ancestor_map=MappingProxyType(ancestors),
        descendant_map=MappingProxyType(descendants),
        restricted_to=cg.restricted_to,
        load_seconds=load_seconds,
    )


def default_duo_path() -> Path:
    """Path of the vendored ``ontologies/duo/duo.owl`` (package data)."""
    return Path(str(resources.files("ontologies").joinpath("duo", "duo.owl")))


def load_duo(path: str | os.PathLike[str] | None = None) -> DuoOntology:
    """Parse ``duo.owl`` with rdflib and compute closures; cached per resolved path.

    ``path=None`` loads the vendored release.  Call it once at start-up (the gateway keeps the
    result in its app state); repeated calls with the same path return the same object.

    :raises OSError: the file cannot be read.
    :raises xml.sax.SAXParseException: the file is not RDF/XML.
    """
    resolved = Path(path) if path is not None else default_duo_path()
    return _load_duo_cached(str(resolved.resolve()))


@functools.lru_cache(maxsize=4)
def _load_duo_cached(path: str) -> DuoOntology:
    started = time.perf_counter()
    graph = rdflib.Graph()
    graph.parse(path, format="xml")
    ontology = build_duo_ontology(graph, source=path, load_seconds=0.0)
    elapsed = time.perf_counter() - started
    logger.info(
        "loaded DUO %s from %s: %d triples, %d classes, %d obsolete, in %.3f s",
        ontology.version_iri,
        path,
        len(graph),
        len(ontology.terms),
        len(ontology.obsolete),
        elapsed,
    )
    return dataclasses.replace(ontology, load_seconds=elapsed)
