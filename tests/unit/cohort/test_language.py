"""The cohort definition language: valid documents parse, invalid ones fail naming the field."""

from __future__ import annotations

import pytest

from mappings.cohort import CohortError, parse
from tests.integration.federation_ref import COHORTS


@pytest.mark.parametrize("name", sorted(COHORTS))
def test_examples_parse(name):
    node = parse(COHORTS[name])
    assert node.path == "$"


@pytest.mark.parametrize("doc, field", [
    ([], "$"),
    ({"sex": "female", "age": {"min": 3}}, "$"),
    ({"bogus": 1}, "$.bogus"),
    ({"all": []}, "$.all"),
    ({"all": [{"sex": "woman"}]}, "$.all[0].sex"),
    ({"age": {"min": 80, "max": 40}}, "$.age"),
    ({"age": {"min": 40, "at": "yesterday"}}, "$.age.at"),
    ({"observation": {"code": "http://loinc.org|4548-4", "value": {"min": "high"}}}, "$.observation.value.min"),
    ({"observation": {"code": "x", "valu": {}}}, "$.observation.valu"),
    ({"imaging": {"study_date": {"from": "2020-13-01"}}}, "$.imaging.study_date.from"),
    ({"seg": {"segments": []}}, "$.seg.segments"),
    ({"sr": {"items": [{"value": {"min": 1}}]}}, "$.sr.items[0]"),
    ({"sr": {"items": [{"concept": "LN:1"}], "same": "study"}}, "$.sr.same"),
    ({"condition": {"code": "a|b", "within": {"of": "nope", "min_days": 0}}}, "$.condition.within.of"),
    ({"all": [{"id": "x", "sex": "male"}, {"id": "x", "sex": "female"}]}, "$.all[1].id"),
])
def test_errors_name_the_field(doc, field):
    with pytest.raises(CohortError) as err:
        parse(doc)
    assert err.value.field == field, str(err.value)


def test_within_must_refer_to_an_event_criterion():
    from gateway.store.cohort import compile_cohort
    from gateway.store.scope import UNRESTRICTED

    doc = {"all": [{"id": "s", "sex": "female"}, {"condition": {"code": "a|b", "within": {"of": "s", "max_days": 1}}}]}
    with pytest.raises(CohortError) as err:
        compile_cohort(parse(doc), UNRESTRICTED)
    assert err.value.field == "$.all[1].condition.within.of"
