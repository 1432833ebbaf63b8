"""Bulk Data kick-off parameters (mappings.fhir.bulk) and SMART Backend Services scope grants (pure)."""

from __future__ import annotations

import orjson
import pytest

from gateway.auth import scope_resource_types
from gateway.services.backend_auth import grant
from mappings.fhir.bulk import (
    SUBSETTED,
    ExportRequest,
    KickoffError,
    ndjson_page,
    parameters_pairs,
    parse_kickoff,
    subset,
)


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
    ([("_elements", "Patient.name.given")], "_elements"),
    ([("_elements", "")], "_elements"),
    ([("patient", "Observation/1")], "patient"),
    ([("patient", '{"reference": 7}')], "patient"),
    ([("includeAssociatedData", "LatestProvenanceResources")], "includeAssociatedData"),
    ([("nonsense", "1")], "nonsense"),
])
def test_parse_kickoff_refuses_what_it_does_not_support(pairs, param):
    with pytest.raises(KickoffError) as e:
        parse_kickoff(pairs)
    assert e.value.param == param


def test_lenient_ignores_unsupported_parameters():
    req = parse_kickoff([("includeAssociatedData", "LatestProvenanceResources"), ("_type", "Patient")], lenient=True)
    assert req.ignored == ("includeAssociatedData",) and req.types == ("Patient",)


def test_patient_and_elements_parameters():
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        {"name": "patient", "valueReference": {"reference": "https://ehr.example/fhir/Patient/p2"}},
        {"name": "_elements", "valueString": "Patient.birthDate,value"}]}
    req = parse_kickoff(parameters_pairs(body) + [("patient", "Patient/p1")])
    assert req.patients == ("p1", "p2") and req.elements == ("Patient.birthDate", "value")
    assert ExportRequest.from_json(req.to_json()) == ExportRequest(patients=("p1", "p2"),
                                                                   elements=("Patient.birthDate", "value"))


def test_elements_subset_keeps_mandatory_elements_and_tags_subsetted():
    obs = {"resourceType": "Observation", "id": "o1", "meta": {"tag": [{"system": "urn:x", "code": "t"}]},
           "status": "final", "code": {"text": "hr"}, "subject": {"reference": "Patient/p1"},
           "valueQuantity": {"value": 60}, "_status": {"id": "s"}, "note": [{"text": "free text"}]}
    out = subset(obs, ("value", "Patient.birthDate"))
    assert set(out) == {"resourceType", "id", "meta", "status", "_status", "code", "valueQuantity"}
    assert out["meta"]["tag"] == [{"system": "urn:x", "code": "t"}, SUBSETTED]
    pat = {"resourceType": "Patient", "id": "p1", "name": [{"family": "X"}], "birthDate": "1970-01-01"}
    assert subset(pat, ("Patient.birthDate",)) == {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01",
                                                   "meta": {"tag": [SUBSETTED]}}
    assert subset(pat, ("Observation.value",)) is pat  # no element of its type asked: whole
    # de-identified, then subsetted
    data, held = ndjson_page([orjson.dumps(pat).decode()], "proj", b"s" * 32, ("Patient.name", "Patient.birthDate"))
    (line,) = [orjson.loads(x) for x in data.splitlines()]
    assert held == 0 and set(line) == {"resourceType", "id", "meta", "birthDate"} and line["id"] != "p1"


def test_parameters_resource_pairs():
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"}, {"name": "_since", "valueInstant": "2024-01-01T00:00:00Z"},
        {"name": "patient", "valueReference": {"reference": "Patient/1"}}]}
    pairs = parameters_pairs(body)
    assert pairs[:2] == [("_type", "Patient"), ("_since", "2024-01-01T00:00:00Z")] and pairs[2][0] == "patient"
    assert parse_kickoff(pairs).patients == ("1",)
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
