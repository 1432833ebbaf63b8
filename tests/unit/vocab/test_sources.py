"""Vocabulary parsers (mappings/vocab/sources.py): Athena, OBO, FHIR CodeSystem; closure; bad input."""

from __future__ import annotations

import io

import pytest

from mappings.vocab.sources import (
    VocabFormatError,
    athena_release,
    closure_rows,
    codesystem_release,
    obo_release,
    obo_system,
)
from tests.vocab_ref import VOCAB, snomed_descendants


def _closure(parsed) -> dict[str, set[str]]:
    rows = parsed.closure if parsed.closure is not None else closure_rows(parsed.parents)
    out: dict[str, set[str]] = {}
    for _system, anc, desc, _levels in rows:
        out.setdefault(anc, set()).add(desc)
    return out


def test_athena_subset_uses_concept_ancestor():
    d = VOCAB / "snomed-athena"
    with (d / "CONCEPT.csv").open() as c, (d / "CONCEPT_ANCESTOR.csv").open() as a:
        parsed = athena_release(c, None, a)
        assert parsed.systems == ["http://snomed.info/sct"]
        assert _closure(parsed) == snomed_descendants()


def test_athena_without_ancestor_file_computes_closure_from_is_a():
    d = VOCAB / "snomed-athena"
    with (d / "CONCEPT.csv").open() as c, (d / "CONCEPT_RELATIONSHIP.csv").open() as r:
        parsed = athena_release(c, r, None)
    assert _closure(parsed) == snomed_descendants()
    levels = {(a, dd): lv for _s, a, dd, lv in closure_rows(parsed.parents)}
    assert levels[("73211009", "46635009")] == 1 and levels[("404684003", "46635009")] == 4


def test_athena_bad_header_and_bad_id():
    with pytest.raises(VocabFormatError, match="missing columns"):
        athena_release(io.StringIO("a,b,c\n1,2,3\n"), None, None)
    bad = "concept_id\tconcept_code\tvocabulary_id\nabc\tX\tSNOMED\n"
    with pytest.raises(VocabFormatError, match="CONCEPT.csv:2"):
        athena_release(io.StringIO(bad), None, None)


def test_obo_names_obsolete_and_header():
    text = """format-version: 1.2
data-version: 2024-01-01
ontology: mondo

[Term]
id: MONDO:0000001
name: disease

[Term]
id: MONDO:0004992
name: cancer
is_a: MONDO:0000001 ! disease

[Term]
id: MONDO:0009999
name: obsolete thing
is_a: MONDO:0004992
is_obsolete: true

[Term]
id: MONDO:0005105
name: melanoma
is_a: MONDO:0004992 {source="x"} ! cancer
is_a: MONDO:0009999

[Typedef]
id: part_of
"""
    parsed = obo_release(io.StringIO(text))
    assert parsed.release == "2024-01-01" and parsed.name == "mondo"
    assert {c[1]: c[2] for c in parsed.concepts} == {"MONDO:0000001": "disease", "MONDO:0004992": "cancer",
                                                      "MONDO:0005105": "melanoma"}
    assert _closure(parsed) == {"MONDO:0000001": {"MONDO:0004992", "MONDO:0005105"}, "MONDO:0004992": {"MONDO:0005105"}}
    assert parsed.systems == [obo_system("mondo")]


def test_obo_rejects_non_obo():
    with pytest.raises(VocabFormatError):
        obo_release(io.StringIO("just some text\n"))
    with pytest.raises(VocabFormatError, match="no \\[Term\\]"):
        obo_release(io.StringIO("format-version: 1.2\n"))


def test_codesystem_nested_and_properties():
    cs = {"resourceType": "CodeSystem", "url": "http://example.org/cs", "version": "3", "content": "complete",
          "concept": [{"code": "A", "display": "a", "concept": [{"code": "A1", "concept": [{"code": "A11"}]}]},
                      {"code": "B", "property": [{"code": "parent", "valueCode": "A"}]},
                      {"code": "C", "property": [{"code": "subsumedBy", "valueCode": "B"},
                                                 {"code": "parent", "valueCode": "nope"}]}]}
    parsed = codesystem_release(cs)
    assert parsed.release == "3"
    assert _closure(parsed) == {"A": {"A1", "A11", "B", "C"}, "A1": {"A11"}, "B": {"C"}}


@pytest.mark.parametrize("doc,msg", [
    ({"resourceType": "ValueSet"}, "not a FHIR CodeSystem"),
    ({"resourceType": "CodeSystem", "concept": [{"code": "x"}]}, "url is required"),
    ({"resourceType": "CodeSystem", "url": "u", "concept": [{"display": "no code"}]}, r"concept\[0\].code"),
    ({"resourceType": "CodeSystem", "url": "u", "concept": {"code": "x"}}, "must be an array"),
    ({"resourceType": "CodeSystem", "url": "u"}, "no concept"),
])
def test_codesystem_bad(doc, msg):
    with pytest.raises(VocabFormatError, match=msg):
        codesystem_release(doc)


def test_closure_survives_cycles():
    rows = set(closure_rows({("s", "a"): {"b"}, ("s", "b"): {"a"}}))
    assert rows == {("s", "b", "a", 1), ("s", "a", "b", 1)}
