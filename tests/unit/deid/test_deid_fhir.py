"""FHIR de-identification (issue #24): planted PHI, references, date shifts, Safe Harbor ages."""

from __future__ import annotations

import json
from datetime import date

from mappings.deid.fhir import AGE_90_PLUS_URL, deidentify_resource
from mappings.deid.keys import ProjectKeys

KEYS = ProjectKeys("study-a", b"k" * 32)
PHI = ["Zebulon", "Quartermaine", "MRN7734501", "Wallaby", "1938-04-12", "555-0199", "02115", "Springfield",
       "Dr Nefarious", "called his daughter"]

PATIENT = {
    "resourceType": "Patient", "id": "pat-7",
    "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Zebulon Quartermaine</div>"},
    "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN7734501"}],
    "name": [{"family": "Quartermaine", "given": ["Zebulon"]}],
    "telecom": [{"system": "phone", "value": "555-0199"}],
    "address": [{"line": ["42 Wallaby Way"], "city": "Springfield", "state": "MA", "postalCode": "02115",
                 "country": "US"}],
    "birthDate": "1938-04-12", "gender": "male",
    "contact": [{"name": {"family": "Quartermaine"}, "telecom": [{"value": "555-0199"}]}],
    "generalPractitioner": [{"reference": "Practitioner/dr1", "display": "Dr Nefarious"}],
}
OBSERVATION = {
    "resourceType": "Observation", "id": "obs-1", "status": "final",
    "code": {"text": "Zebulon's weight"},
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                              "code": "vital-signs"}]}],
    "subject": {"reference": "Patient/pat-7", "display": "Zebulon Quartermaine"},
    "performer": [{"identifier": {"system": "urn:oid:1.2.3", "value": "MRN7734501"}, "type": "Patient"}],
    "effectiveDateTime": "2020-03-15T10:00:00+01:00",
    "valueQuantity": {"value": 70, "unit": "kg"},
    "note": [{"text": "called his daughter Wallaby"}],
    "contained": [{"resourceType": "Patient", "id": "c1", "name": [{"text": "Zebulon"}]}],
}


def test_planted_phi_appears_nowhere():
    for res in (PATIENT, OBSERVATION):
        out = json.dumps(deidentify_resource(res, KEYS))
        for text in PHI:
            assert text not in out, (res["resourceType"], text)


def test_references_identifiers_and_dates_are_consistent():
    p = deidentify_resource(PATIENT, KEYS)
    o = deidentify_resource(OBSERVATION, KEYS)
    assert o["subject"]["reference"] == f"Patient/{p['id']}"
    assert o["performer"][0]["identifier"] == p["identifier"][0]
    assert p["address"] == [{"state": "MA", "country": "US"}]
    off = KEYS.date_offset_days("pat-7")
    assert -365 <= off <= -1
    assert o["effectiveDateTime"].endswith("T10:00:00+01:00") and o["effectiveDateTime"] != OBSERVATION["effectiveDateTime"]
    assert o["code"] == {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                        "valueCode": "masked"}]}
    assert o["category"] == OBSERVATION["category"]
    other = deidentify_resource(PATIENT, ProjectKeys("study-b", b"k" * 32))
    assert other["id"] != p["id"] and other["identifier"] != p["identifier"]
    assert deidentify_resource(PATIENT, KEYS) == p


def test_ages_over_89_are_aggregated():
    old = deidentify_resource(PATIENT, KEYS, as_of=date(2030, 1, 1))
    assert old["birthDate"] == "1940" and {"url": AGE_90_PLUS_URL, "valueBoolean": True} in old["extension"]
    young = deidentify_resource({**PATIENT, "birthDate": "1990-06-01"}, KEYS, as_of=date(2026, 1, 1))
    assert young["birthDate"] in ("1989", "1990") and "extension" not in young


def test_binary_and_ambiguous_resources_are_withheld():
    assert deidentify_resource({"resourceType": "Binary", "id": "b", "contentType": "text/plain"}, KEYS) is None
    group = {"resourceType": "Basic", "id": "x", "code": {"coding": [{"code": "c"}]},
             "extension": [{"url": "u", "valueReference": {"reference": "Patient/a"}},
                           {"url": "u", "valueReference": {"reference": "Patient/b"}}]}
    assert deidentify_resource(group, KEYS) is None
    org = deidentify_resource({"resourceType": "Organization", "id": "o", "name": "General"}, KEYS)
    assert org["name"] == "General"


def test_project_keys_pickle_and_hide_the_secret():
    import pickle

    again = pickle.loads(pickle.dumps(KEYS))
    assert again == KEYS and again.uid_for("1.2.3") == KEYS.uid_for("1.2.3")
    assert "k" * 32 not in repr(KEYS) and repr(KEYS) == "ProjectKeys(project='study-a')"
