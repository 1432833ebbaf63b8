"""OMOP vocabulary: source codes → OMOP concept ids (pure, no I/O after loading).

Two sources, same interface:

* the small subset shipped here (``concepts.csv`` + ``source_to_concept.csv``; provenance and licences
  in ``SOURCES.md``), enough for the demo data, the person/visit vocabularies and DICOM terms;
* a full OHDSI vocabulary download from Athena (``CONCEPT.csv`` + ``CONCEPT_RELATIONSHIP.csv``, tab
  separated), where non-standard source concepts are followed through their ``Maps to`` relationship
  (OMOP CDM v5.4 conventions: ``*_concept_id`` is the standard concept, ``*_source_concept_id`` the
  concept of the source code itself).

A code the vocabulary does not know maps to concept 0 ("No matching concept") and keeps its
``*_source_value``; :class:`Coverage` counts mapped and unmapped codes per table and vocabulary.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: FHIR / DICOM code-system identifiers → OMOP vocabulary_id.
SYSTEM_TO_VOCAB: dict[str, str] = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://unitsofmeasure.org": "UCUM",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://dicom.nema.org/resources/ontology/DCM": "DICOM",
    # DICOM SR coding scheme designators (PS3.16 §8)
    "SCT": "SNOMED",
    "SRT": "SNOMED",
    "LN": "LOINC",
    "UCUM": "UCUM",
    "DCM": "DICOM",
}
VOCAB_TO_SYSTEM: dict[str, str] = {
    "SNOMED": "http://snomed.info/sct",
    "LOINC": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "RxNorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "DICOM": "http://dicom.nema.org/resources/ontology/DCM",
}

#: concept_class_id used for CONCEPT rows of the shipped subset when the CSV leaves it empty.
DEFAULT_CLASS = "Undefined"


@dataclass(frozen=True, slots=True)
class Concept:
    concept_id: int
    vocabulary: str
    code: str
    name: str
    domain: str
    standard: str | None  # "S", "C" or None
    concept_class: str = DEFAULT_CLASS


NO_MATCH = Concept(0, "None", "No matching concept", "No matching concept", "Metadata", None, "Undefined")


@dataclass(frozen=True, slots=True)
class Mapped:
    """One source code's mapping: the standard ``concept_id`` (0 if none) and the source concept."""

    concept_id: int
    source_concept_id: int
    domain: str | None


UNMAPPED = Mapped(0, 0, None)


@dataclass
class Vocabulary:
    """Concepts by id and by (vocabulary, code), plus 'Maps to' links and source-code maps."""

    by_id: dict[int, Concept] = field(default_factory=dict)
    by_code: dict[tuple[str, str], Concept] = field(default_factory=dict)
    maps_to: dict[int, int] = field(default_factory=dict)
    #: (source vocabulary, source code) → concept id (SOURCE_TO_CONCEPT_MAP style; non-OMOP codes).
    source_map: dict[tuple[str, str], int] = field(default_factory=dict)
    origin: str = "subset"

    def add(self, c: Concept) -> None:
        self.by_id[c.concept_id] = c
        key = (c.vocabulary, c.code)
        # several concepts may share a code across invalid/valid versions: prefer a standard one
        old = self.by_code.get(key)
        if old is None or (c.standard == "S" and old.standard != "S"):
            self.by_code[key] = c

    # -- look-ups -----------------------------------------------------------------------------

    def concept(self, vocabulary: str | None, code: str | None) -> Concept | None:
        if not vocabulary or code is None:
            return None
        return self.by_code.get((vocabulary, str(code)))

    def map(self, vocabulary: str | None, code: str | None) -> Mapped:
        """Standard concept for a (vocabulary, code): the concept itself when standard, else its
        'Maps to' target; the source concept id is kept either way."""
        src = self.concept(vocabulary, code)
        if src is None:
            return UNMAPPED
        if src.standard == "S":
            return Mapped(src.concept_id, src.concept_id, src.domain)
        target = self.by_id.get(self.maps_to.get(src.concept_id, -1))
        if target is not None:
            return Mapped(target.concept_id, src.concept_id, target.domain)
        return Mapped(0, src.concept_id, src.domain)

    def map_system(self, system: str | None, code: str | None) -> Mapped:
        """Like :meth:`map` for a FHIR system URI or DICOM coding scheme designator."""
        return self.map(SYSTEM_TO_VOCAB.get(system or ""), code)

    def map_dicom(self, code: str | None) -> Mapped:
        """A DICOM term (modality, body part) → its MI-CDM DICOM-vocabulary concept; MI-CDM stores
        these concepts in ``modality_concept_id`` / ``anatomic_site_concept_id`` although the DICOM
        vocabulary is not standard."""
        c = self.concept("DICOM", code)
        return Mapped(c.concept_id, c.concept_id, c.domain) if c is not None else UNMAPPED

    def map_source(self, source_vocabulary: str, code: str | None) -> Mapped:
        """A code of a non-OMOP source vocabulary (FHIR gender, CDC race, v3 ActCode) → concept."""
        if code is None:
            return UNMAPPED
        cid = self.source_map.get((source_vocabulary, str(code)))
        if cid is None or cid not in self.by_id:
            return UNMAPPED
        return Mapped(cid, 0, self.by_id[cid].domain)

    def system_of(self, concept_id: int | None) -> tuple[str | None, str | None, str | None]:
        """(FHIR system, code, name) of a concept id, for the import direction."""
        c = self.by_id.get(concept_id or 0)
        if c is None or c.concept_id == 0:
            return None, None, None
        return VOCAB_TO_SYSTEM.get(c.vocabulary, c.vocabulary), c.code, c.name

    def reverse_source(self, source_vocabulary: str, concept_id: int | None) -> str | None:
        for (voc, code), cid in self.source_map.items():
            if voc == source_vocabulary and cid == concept_id:
                return code
        return None


def _read_subset(vocab: Vocabulary, directory: Path) -> None:
    with (directory / "concepts.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            vocab.add(
                Concept(
                    int(r["concept_id"]),
                    r["vocabulary"],
                    r["code"],
                    r["name"],
                    r["domain"],
                    r["standard"] or None,
                    r.get("concept_class") or DEFAULT_CLASS,
                )
            )
    stc = directory / "source_to_concept.csv"
    if stc.exists():
        with stc.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                vocab.source_map[(r["source_vocabulary"], r["source_code"])] = int(r["concept_id"])


def load_subset(directory: Path | None = None) -> Vocabulary:
    """The vocabulary subset shipped in ``mappings/vocab`` (or another directory of the same shape)."""
    vocab = Vocabulary(origin="subset")
    _read_subset(vocab, directory or HERE)
    return vocab


#: Vocabularies read from an Athena download by default (what fedgate's sources use); a full download
#: holds millions of concepts, most of them (drugs, claims codes) never referenced by an export.
ATHENA_VOCABULARIES = frozenset(SYSTEM_TO_VOCAB.values()) | {
    "Gender",
    "Race",
    "Ethnicity",
    "Visit",
    "Type Concept",
    "None",
    "CDM",
    "Domain",
    "Vocabulary",
    "Concept Class",
}


def load_athena(directory: Path, vocabularies: frozenset[str] | None = ATHENA_VOCABULARIES) -> Vocabulary:
    """A full OHDSI vocabulary (Athena download: tab-separated ``CONCEPT.csv`` and
    ``CONCEPT_RELATIONSHIP.csv``), plus the shipped source-code maps (gender, race, visit class).
    Only ``vocabularies`` are kept (None: all); 'Maps to' targets are kept whatever their vocabulary."""
    csv.field_size_limit(sys.maxsize)
    directory = Path(directory)
    concept_file = directory / "CONCEPT.csv"
    if not concept_file.exists():
        raise FileNotFoundError(f"vocabulary: {concept_file} not found (expected an Athena download)")
    vocab = Vocabulary(origin=str(directory))
    vocab.add(NO_MATCH)
    with concept_file.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if r.get("invalid_reason"):
                continue
            if vocabularies is not None and r["vocabulary_id"] not in vocabularies and r.get("standard_concept") != "S":
                continue
            vocab.add(
                Concept(
                    int(r["concept_id"]),
                    r["vocabulary_id"],
                    r["concept_code"],
                    r["concept_name"],
                    r["domain_id"],
                    r.get("standard_concept") or None,
                    r.get("concept_class_id") or DEFAULT_CLASS,
                )
            )
    rel_file = directory / "CONCEPT_RELATIONSHIP.csv"
    if rel_file.exists():
        with rel_file.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if r["relationship_id"] == "Maps to" and not r.get("invalid_reason"):
                    vocab.maps_to.setdefault(int(r["concept_id_1"]), int(r["concept_id_2"]))
    with (HERE / "source_to_concept.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            vocab.source_map[(r["source_vocabulary"], r["source_code"])] = int(r["concept_id"])
    return vocab


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """The shipped subset when ``path`` is empty, else the Athena download in ``path``."""
    if not path:
        return load_subset()
    p = Path(path)
    if (p / "CONCEPT.csv").exists():
        return load_athena(p)
    return load_subset(p)


@dataclass
class Coverage:
    """Mapping coverage: per (table, vocabulary) mapped/unmapped counts and the top unmapped codes."""

    mapped: Counter[Any] = field(default_factory=Counter)
    unmapped: Counter[Any] = field(default_factory=Counter)
    unmapped_codes: dict[tuple[str, str], Counter[Any]] = field(default_factory=dict)
    skipped: Counter[Any] = field(default_factory=Counter)

    def note(self, table: str, vocabulary: str | None, code: str | None, concept_id: int) -> None:
        key = (table, vocabulary or "(none)")
        if concept_id:
            self.mapped[key] += 1
        else:
            self.unmapped[key] += 1
            self.unmapped_codes.setdefault(key, Counter())[code or "(none)"] += 1

    def skip(self, table: str, reason: str) -> None:
        self.skipped[(table, reason)] += 1

    def report(self, top: int = 10) -> dict[Any, Any]:
        keys = sorted(set(self.mapped) | set(self.unmapped))
        rows = []
        for table, voc in keys:
            m, u = self.mapped[(table, voc)], self.unmapped[(table, voc)]
            rows.append(
                {
                    "table": table,
                    "vocabulary": voc,
                    "mapped": m,
                    "unmapped": u,
                    "coverage": round(m / (m + u), 4) if m + u else None,
                    "top_unmapped": [
                        {"code": c, "count": n}
                        for c, n in self.unmapped_codes.get((table, voc), Counter()).most_common(top)
                    ],
                }
            )
        total_m, total_u = sum(self.mapped.values()), sum(self.unmapped.values())
        return {
            "by_table_vocabulary": rows,
            "mapped": total_m,
            "unmapped": total_u,
            "coverage": round(total_m / (total_m + total_u), 4) if total_m + total_u else None,
            "skipped": [{"table": t, "reason": r, "count": n} for (t, r), n in sorted(self.skipped.items())],
        }
