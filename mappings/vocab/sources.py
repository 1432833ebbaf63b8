"""Vocabulary sources → concepts and is-a closure rows (pure: callers open the files).

Three formats feed the vocabulary store (``gateway/store/vocab_schema.py``, docs/vocab.md):

* **Athena** (OHDSI vocabulary download): tab-separated ``CONCEPT.csv``, ``CONCEPT_RELATIONSHIP.csv``,
  ``CONCEPT_ANCESTOR.csv``.  The closure is Athena's own CONCEPT_ANCESTOR (rows with
  ``min_levels_of_separation`` > 0, both ends in the same vocabulary); without that file it is computed
  from the ``Is a`` relationships.  The system of a concept is the FHIR URI of its vocabulary
  (:data:`mappings.vocab.VOCAB_TO_SYSTEM`), else the vocabulary id itself.
* **OBO** flat files (MONDO, DOID, HPO): ``[Term]`` stanzas, ``id`` / ``name`` / ``is_a`` /
  ``is_obsolete``; codes are CURIEs (``MONDO:0004992``), the system is the ontology's PURL
  (``http://purl.obolibrary.org/obo/mondo.owl``).  OWL files go through rdflib
  (:func:`owl_release`), same shape.
* **FHIR CodeSystem** resources: nested ``concept`` and/or the ``parent`` / ``subsumedBy``
  properties.

Every parser returns a :class:`Parsed`: the concepts, the direct parents, and the release's metadata;
:func:`closure_rows` computes the strict transitive closure once (with the minimum number of levels).
"""

from __future__ import annotations

import csv
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mappings.vocab import VOCAB_TO_SYSTEM

OBO_PURL = "http://purl.obolibrary.org/obo/"


class VocabFormatError(ValueError):
    """A vocabulary file that cannot be read (the message names the file and the line or field)."""


@dataclass
class Parsed:
    """One vocabulary release: concepts ``(system, code, display, concept_id, vocabulary_id)`` and
    either direct parents (``(system, child) → {parent}``) or precomputed closure rows."""

    name: str
    release: str
    fmt: str
    concepts: list[tuple[str, str, str | None, int | None, str | None]] = field(default_factory=list)
    parents: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    #: precomputed strict closure (system, ancestor, descendant, min_levels); None → compute from parents
    closure: Iterable[tuple[str, str, str, int]] | None = None
    closure_size: int | None = None

    @property
    def systems(self) -> list[str]:
        return sorted({c[0] for c in self.concepts})


def closure_rows(parents: Mapping[tuple[str, str], Iterable[str]]) -> Iterator[tuple[str, str, str, int]]:
    """Strict is-a closure ``(system, ancestor, descendant, min_levels)`` by a breadth-first walk up
    from every code (cycles are harmless: a code is never its own strict ancestor)."""
    for (system, code), direct in parents.items():
        seen = {code}
        frontier = deque((p, 1) for p in direct)
        while frontier:
            node, level = frontier.popleft()
            if node in seen:
                continue
            seen.add(node)
            yield system, node, code, level
            for p in parents.get((system, node), ()):
                if p not in seen:
                    frontier.append((p, level + 1))


# ------------------------------------------------------------------------------------------------
# Athena
# ------------------------------------------------------------------------------------------------


def _tsv(lines: Iterable[str], source: str, required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
        raise VocabFormatError(f"{source}: not an Athena tab-separated file (missing columns {', '.join(missing)})")
    yield from reader


def athena_release(
    concepts: Iterable[str],
    relationships: Iterable[str] | None,
    ancestors: Iterable[str] | None,
    *,
    release: str = "",
    name: str = "athena",
    vocabularies: frozenset[str] | None = None,
) -> Parsed:
    """An Athena download; ``vocabularies`` keeps only those vocabulary ids (None: all).

    ``ancestors`` (CONCEPT_ANCESTOR) is consumed lazily by :attr:`Parsed.closure`, so a file of
    millions of rows is never held in memory."""
    out = Parsed(name=name, release=release, fmt="athena")
    by_id: dict[int, tuple[str, str]] = {}
    for n, r in enumerate(_tsv(concepts, "CONCEPT.csv", ("concept_id", "concept_code", "vocabulary_id")), 2):
        if r.get("invalid_reason"):
            continue
        voc = r["vocabulary_id"]
        if vocabularies is not None and voc not in vocabularies:
            continue
        try:
            cid = int(r["concept_id"])
        except (TypeError, ValueError):
            raise VocabFormatError(f"CONCEPT.csv:{n}: concept_id {r['concept_id']!r} is not an integer") from None
        system = VOCAB_TO_SYSTEM.get(voc, voc)
        by_id[cid] = (system, r["concept_code"])
        out.concepts.append((system, r["concept_code"], r.get("concept_name") or None, cid, voc))
    if ancestors is not None:

        def rows() -> Iterator[tuple[str, str, str, int]]:
            for n, r in enumerate(
                _tsv(ancestors, "CONCEPT_ANCESTOR.csv", ("ancestor_concept_id", "descendant_concept_id")), 2
            ):
                try:
                    a, d = by_id.get(int(r["ancestor_concept_id"])), by_id.get(int(r["descendant_concept_id"]))
                    levels = int(r.get("min_levels_of_separation") or 1)
                except (TypeError, ValueError):
                    raise VocabFormatError(f"CONCEPT_ANCESTOR.csv:{n}: ids must be integers") from None
                if a is None or d is None or levels <= 0 or a[0] != d[0] or a == d:
                    continue
                yield a[0], a[1], d[1], levels

        out.closure = rows()
    elif relationships is not None:
        for r in _tsv(relationships, "CONCEPT_RELATIONSHIP.csv", ("concept_id_1", "concept_id_2", "relationship_id")):
            if r["relationship_id"] != "Is a" or r.get("invalid_reason"):
                continue
            child, parent = by_id.get(int(r["concept_id_1"])), by_id.get(int(r["concept_id_2"]))
            if child and parent and child[0] == parent[0] and child != parent:
                out.parents.setdefault(child, set()).add(parent[1])
    return out


# ------------------------------------------------------------------------------------------------
# OBO / OWL
# ------------------------------------------------------------------------------------------------


def obo_system(ontology: str) -> str:
    """The PURL of an OBO ontology id (``mondo`` → ``http://purl.obolibrary.org/obo/mondo.owl``)."""
    return f"{OBO_PURL}{ontology.strip().lower()}.owl"


def obo_release(
    lines: Iterable[str], *, source: str = "<obo>", name: str | None = None, release: str | None = None
) -> Parsed:
    """An OBO 1.4 file: ``[Term]`` ids, names, ``is_a`` parents; obsolete terms are left out (and are
    never ancestors).  The header's ``ontology`` names the system, ``data-version`` the release."""
    from ontologies.terms import TermError, normalize_curie

    header: dict[str, str] = {}
    terms: dict[str, dict[Any, Any]] = {}
    current: dict[Any, Any] | None = None
    in_term = False
    seen_stanza = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("!"):
            continue
        if line.startswith("["):
            seen_stanza = True
            in_term = line == "[Term]"
            current = None
            continue
        tag, sep, value = line.partition(":")
        if not sep:
            raise VocabFormatError(f"{source}:{number}: expected 'tag: value', got {line[:60]!r}")
        tag = tag.strip()
        if not seen_stanza:
            header.setdefault(tag, value.strip())
            continue
        if not in_term:
            continue
        if tag == "name" and current is not None:
            current["name"] = value.strip()
            continue
        value = value.split("!", 1)[0].split("{", 1)[0].strip()
        try:
            if tag == "id":
                code = normalize_curie(value)
                current = terms.setdefault(code, {"name": None, "is_a": set(), "obsolete": False})
            elif current is None:
                raise VocabFormatError(f"{source}:{number}: {tag!r} before the stanza's id")
            elif tag == "is_a":
                current["is_a"].add(normalize_curie(value.split()[0] if value else ""))
            elif tag == "is_obsolete" and value.lower() == "true":
                current["obsolete"] = True
        except TermError as err:
            raise VocabFormatError(f"{source}:{number}: {err}") from err
    if not terms:
        raise VocabFormatError(f"{source}: no [Term] stanza (not an OBO file)")
    ontology = header.get("ontology") or next(iter(terms)).split(":", 1)[0]
    system = obo_system(ontology)
    out = Parsed(name=name or ontology, release=release or header.get("data-version", ""), fmt="obo")
    for code, t in terms.items():
        if t["obsolete"]:
            continue
        out.concepts.append((system, code, t["name"], None, None))
        live = {p for p in t["is_a"] if p in terms and not terms[p]["obsolete"] and p != code}
        if live:
            out.parents[(system, code)] = live
    return out


def owl_release(graph: Any, *, source: str = "<owl>", name: str | None = None, release: str | None = None) -> Parsed:
    """An OWL ontology already parsed by rdflib (``rdfs:subClassOf`` between named classes)."""
    from ontologies.duo_graph import read_class_graph

    cg = read_class_graph(graph)
    known = (cg.classes | frozenset(cg.parents)) - cg.obsolete
    if not known:
        raise VocabFormatError(f"{source}: no owl:Class (not an OWL ontology)")
    prefix = sorted(known)[0].split(":", 1)[0]
    system = obo_system(prefix)
    out = Parsed(name=name or prefix.lower(), release=release or (cg.version_iri or ""), fmt="owl")
    for code in sorted(known):
        out.concepts.append((system, code, cg.labels.get(code), None, None))
        live = {p for p in cg.parents.get(code, ()) if p in known and p != code}
        if live:
            out.parents[(system, code)] = live
    return out


# ------------------------------------------------------------------------------------------------
# FHIR CodeSystem
# ------------------------------------------------------------------------------------------------


def codesystem_release(doc: object, *, source: str = "<CodeSystem>") -> Parsed:
    """A FHIR R4 CodeSystem: nested ``concept`` (children are subsumed by their parent) and the
    ``parent`` / ``subsumedBy`` concept properties (the FHIR-defined hierarchy properties)."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "CodeSystem":
        raise VocabFormatError(f"{source}: not a FHIR CodeSystem resource")
    url = doc.get("url")
    if not isinstance(url, str) or not url:
        raise VocabFormatError(f"{source}: CodeSystem.url is required")
    out = Parsed(
        name=str(doc.get("name") or doc.get("id") or url), release=str(doc.get("version") or ""), fmt="fhir-codesystem"
    )

    def walk(items: object, parent: str | None, path: str) -> None:
        if items is None:
            return
        if not isinstance(items, list):
            raise VocabFormatError(f"{source}: {path} must be an array")
        for i, c in enumerate(items):
            where = f"{path}[{i}]"
            if not isinstance(c, dict) or not isinstance(c.get("code"), str) or not c["code"]:
                raise VocabFormatError(f"{source}: {where}.code is required")
            code = c["code"]
            out.concepts.append(
                (url, code, c.get("display") if isinstance(c.get("display"), str) else None, None, None)
            )
            if parent is not None:
                out.parents.setdefault((url, code), set()).add(parent)
            for p in c.get("property") or ():
                if (
                    isinstance(p, dict)
                    and p.get("code") in ("parent", "subsumedBy")
                    and isinstance(p.get("valueCode"), str)
                ):
                    out.parents.setdefault((url, code), set()).add(p["valueCode"])
            walk(c.get("concept"), code, f"{where}.concept")

    walk(doc.get("concept"), None, "CodeSystem.concept")
    if not out.concepts:
        raise VocabFormatError(f"{source}: the CodeSystem has no concept (content must be complete)")
    known = {c[1] for c in out.concepts}
    for key in list(out.parents):
        out.parents[key] = {p for p in out.parents[key] if p in known and p != key[1]}
        if not out.parents[key]:
            del out.parents[key]
    return out


__all__ = [
    "Parsed",
    "VocabFormatError",
    "closure_rows",
    "athena_release",
    "obo_release",
    "owl_release",
    "codesystem_release",
    "obo_system",
    "OBO_PURL",
]
