"""CURIE / IRI normalisation for ontology terms (DUO, MONDO and other OBO Foundry ontologies).

DUO.md, header: "IRI pattern: ``DUO:NNNNNNN`` = ``http://purl.obolibrary.org/obo/DUO_NNNNNNN``".
Every code that enters the consent logic (consent permission and modifiers, purpose codes, disease
classes, request-supplied ancestor maps) passes through :func:`normalize_curie` so that the CURIE
form, the OBO PURL form (http or https), the ``obo:`` prefixed form and the bare ``DUO_0000007`` form
all compare equal.

Normalisation is purely syntactic.  It never decides whether a code *exists*: that is the job of the
loaded ontology (:mod:`ontologies.duo_graph`) or disease hierarchy (:mod:`ontologies.diseases`), which
fail closed on anything they do not know.  In particular the misspelled NPOA IRI
``http://purl.obolibrary.org/obo/DUO_00000044`` normalises to ``DUO:00000044``; the DUO ontology
object knows it as an alias of ``DUO:0000044`` (DUO.md, "Quirks to handle" (1)).
"""

from __future__ import annotations

import re

__all__ = [
    "OBO_PURL",
    "CLINICAL_CARE_MARKERS",
    "TermError",
    "normalize_curie",
    "curie_to_iri",
    "is_obo_curie",
]

#: Base of OBO Foundry PURLs: ``OBO_PURL + "DUO_0000007"`` is the IRI of DUO:0000007.
OBO_PURL = "http://purl.obolibrary.org/obo/"

#: Purpose markers (besides DUO:0000043) that mean "clinical care" rather than research.
CLINICAL_CARE_MARKERS = frozenset({"clinical-care", "clinical_care"})

_OBO_IRI = re.compile(r"^https?://purl\.obolibrary\.org/obo/([A-Za-z][A-Za-z0-9]*)_([A-Za-z0-9_]+)$")
_OBO_PREFIXED = re.compile(r"^obo:([A-Za-z][A-Za-z0-9]*)_([A-Za-z0-9_]+)$")
# Bare "DUO_0000007": only an upper-case-initial prefix and an all-digit local part, so that
# opaque identifiers such as EDAM's "topic_0003" are left alone.
_BARE_UNDERSCORE = re.compile(r"^([A-Z][A-Za-z]*)_([0-9]+)$")
_CURIE = re.compile(r"^([A-Za-z][A-Za-z0-9.]*):([A-Za-z0-9_.\-]+)$")


class TermError(ValueError):
    """A value that cannot be a term identifier at all (not a string, or empty)."""


def normalize_curie(value: object) -> str:
    """Return the canonical CURIE for an ontology term given as a CURIE or an OBO IRI.

    >>> normalize_curie("http://purl.obolibrary.org/obo/DUO_0000007")
    'DUO:0000007'
    >>> normalize_curie(" DUO:0000007 ")
    'DUO:0000007'
    >>> normalize_curie("obo:MONDO_0005105")
    'MONDO:0005105'
    >>> normalize_curie("DUO_0000042")
    'DUO:0000042'

    Values that are neither a CURIE nor an OBO IRI (an EDAM IRI, a free-text marker) are returned
    stripped but otherwise unchanged; they will simply not resolve in the DUO ontology and so fail
    closed there.

    :raises TermError: ``value`` is not a string or is blank.
    """
    if not isinstance(value, str):
        raise TermError(f"term must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise TermError("term must not be empty")
    for pattern in (_OBO_IRI, _OBO_PREFIXED, _BARE_UNDERSCORE):
        match = pattern.match(text)
        if match:
            return f"{match.group(1)}:{match.group(2)}"
    return text


def is_obo_curie(curie: str) -> bool:
    """True when ``curie`` has the ``PREFIX:LOCAL`` shape (after :func:`normalize_curie`)."""
    return bool(_CURIE.match(curie)) and not curie.startswith(("http:", "https:", "urn:"))


def curie_to_iri(curie: str) -> str:
    """Return the OBO PURL for a ``PREFIX:LOCAL`` CURIE (DUO.md header: IRI pattern).

    >>> curie_to_iri("DUO:0000007")
    'http://purl.obolibrary.org/obo/DUO_0000007'

    :raises TermError: ``curie`` is not a ``PREFIX:LOCAL`` CURIE.
    """
    normal = normalize_curie(curie)
    if not is_obo_curie(normal):
        raise TermError(f"not a CURIE: {curie!r}")
    prefix, local = normal.split(":", 1)
    return f"{OBO_PURL}{prefix}_{local}"
