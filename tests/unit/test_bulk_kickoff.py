"""Bulk Data kick-off parameters (mappings.fhir.bulk) and SMART Backend Services scope grants (pure)."""

from __future__ import annotations

import pytest

from gateway.auth import scope_resource_types
from gateway.services.backend_auth import grant
from mappings.fhir.bulk import ExportRequest, KickoffError, ndjson_page, parameters_pairs, parse_kickoff


def test_parse_kickoff_accepts_the_ig_parameters():
    req = parse_kickoff([("_outputFormat", "ndjson"), ("_type", "Patient,Observation"),
                         ("_since", "2024-01-02T03:04:05.123+01:00"),
                         ("_typeFilter", "Observation?code=a,b&status=final"),
                         ("_typeFilter", "Observation?subject=Patient/x")])
    assert req.types == ("Patient", "Observation") and req.since == "2024-01-02T03:04:05.123+01:00"
    assert req.type_filters == {"Observation": ((("code", "a,b"), ("status", "final")),
                                                (("subject", "Patient/x"),))}
    assert ExportRequest.from_json(req.to_json()) == ExportRequest(req.types, req.since, req.type_filters)


@pytest.mark.parametrize("pairs,param", [
    ([("_outputFormat", "text/csv")], "_outputFormat"),
    ([("_since", "2024-01-02")], "_since"),
    ([("_since", "2024-01-02T00:00:00Z"), ("_since", "2024-01-03T00:00:00Z")], "_since"),
    ([("_type", "patient")], "_type"),
    ([("_typeFilter", "Observation")], "_typeFilter"),
    ([("_typeFilter", "Observation?_count=5")], "_typeFilter"),
    ([("_typeFilter", "Observation?_include=Observation:subject")], "_typeFilter"),
    ([("_type", "Patient"), ("_typeFilter", "Observation?code=1")], "_typeFilter"),
    ([("_elements", "id")], "_elements"),
    ([("patient", "Patient/1")], "patient"),
    ([("nonsense", "1")], "nonsense"),
])
def test_parse_kickoff_refuses_what_it_does_not_support(pairs, param):
    with pytest.raises(KickoffError) as e:
        parse_kickoff(pairs)
    assert e.value.param == param


def test_lenient_ignores_unsupported_parameters():
    assert parse_kickoff([("_elements", "id"), ("_type", "Patient")], lenient=True).ignored == ("_elements",)


def test_parameters_resource_pairs():
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"}, {"name": "_since", "valueInstant": "2024-01-01T00:00:00Z"},
        {"name": "patient", "valueReference": {"reference": "Patient/1"}}]}
    pairs = parameters_pairs(body)
    assert pairs[:2] == [("_type", "Patient"), ("_since", "2024-01-01T00:00:00Z")] and pairs[2][0] == "patient"
    with pytest.raises(KickoffError):
        parse_kickoff(pairs)
    with pytest.raises(KickoffError):
        parameters_pairs({"resourceType": "Patient"})


def test_ndjson_page_is_one_resource_per_line():
    data, held = ndjson_page(['{"resourceType":"Patient","id":"a"}', '{"resourceType":"Patient","id":"b"}'])
    assert data == b'{"resourceType":"Patient","id":"a"}\n{"resourceType":"Patient","id":"b"}\n' and held == 0
    assert ndjson_page([]) == (b"", 0)


def test_backend_scope_grants_and_resource_types():
    assert grant("system/*.read", ("system/*.read",)) == "system/*.read"
    assert grant("system/Patient.read system/Observation.rs", ("system/*.read",)) == \
        "system/Patient.read system/Observation.rs"
    assert grant("system/Patient.read system/Observation.read", ("system/Patient.read",)) == "system/Patient.read"
    assert grant("system/*.write user/*.read patient/*.read", ("system/*.read",)) == ""
    assert scope_resource_types("system/*.read") is None
    assert scope_resource_types("system/Patient.read system/Observation.rs") == {"Patient", "Observation"}
    assert scope_resource_types(None) is None
