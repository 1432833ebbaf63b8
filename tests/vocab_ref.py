"""Test oracle for code hierarchies: reads the shipped Athena subset (demo/data/vocab/snomed-athena) with
the csv module only — no fedgate code — so cohort and FHIR tests compare against an independent closure."""

from __future__ import annotations

import csv
from pathlib import Path

VOCAB = Path(__file__).resolve().parents[1] / "demo" / "data" / "vocab"
SCT = "http://snomed.info/sct"


def _rows(name: str) -> list[dict]:
    with (VOCAB / "snomed-athena" / name).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def snomed_descendants() -> dict[str, set[str]]:
    """SNOMED code → its strict descendants' codes, from CONCEPT_ANCESTOR."""
    code = {r["concept_id"]: r["concept_code"] for r in _rows("CONCEPT.csv")}
    out: dict[str, set[str]] = {}
    for r in _rows("CONCEPT_ANCESTOR.csv"):
        if r["ancestor_concept_id"] != r["descendant_concept_id"]:
            out.setdefault(code[r["ancestor_concept_id"]], set()).add(code[r["descendant_concept_id"]])
    return out


def snomed_children() -> dict[str, set[str]]:
    """SNOMED code → direct children (CONCEPT_RELATIONSHIP 'Is a')."""
    code = {r["concept_id"]: r["concept_code"] for r in _rows("CONCEPT.csv")}
    out: dict[str, set[str]] = {}
    for r in _rows("CONCEPT_RELATIONSHIP.csv"):
        if r["relationship_id"] == "Is a":
            out.setdefault(code[r["concept_id_2"]], set()).add(code[r["concept_id_1"]])
    return out


def expand_codes(system: str | None, code: str) -> set[str]:
    """An Expander for the oracle (tests/integration/federation_ref.Oracle)."""
    if system not in (None, SCT):
        return set()
    return snomed_descendants().get(code, set())
