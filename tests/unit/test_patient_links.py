"""mappings.fhir.links (issue #19): which patients a resource references (pure)."""

from mappings.fhir.links import UNKNOWN, patient_links, primary_patient

ID = {"system": "urn:x", "value": "42"}


def test_every_reference_anywhere():
    res = {"resourceType": "Observation", "subject": {"reference": "Patient/a"},
           "performer": [{"reference": "http://other.example/fhir/Patient/b/_history/3"}],
           "focus": [{"reference": "Group/g"}],
           "extension": [{"url": "u", "valueReference": {"reference": "Patient/c"}}],
           "contained": [{"resourceType": "Provenance", "id": "p", "target": [{"reference": "Patient/d"}]}]}
    links = patient_links(res)
    assert links.ids == {"a", "b", "c", "d"} and not links.identifiers and not links.unknown


def test_identifier_references_and_contained_patients():
    res = {"resourceType": "Task", "for": {"type": "Patient", "identifier": ID},
           "owner": {"identifier": {"system": "urn:prac", "value": "1"}},  # not a compartment element
           "contained": [{"resourceType": "Patient", "id": "pt", "identifier": [{"system": "urn:y", "value": "7"}]}]}
    links = patient_links(res)
    assert set(links.identifiers) == {frozenset({"urn:x|42"}), frozenset({"urn:y|7"})}
    assert links.resolve({"urn:x|42": "p42"}) == {"p42", UNKNOWN}
    assert links.resolve({"urn:x|42": "p42", "urn:y|7": "p7"}) == {"p42", "p7"}
    # an untyped identifier reference at a Patient compartment element (ImagingStudy.subject) names a patient
    img = {"resourceType": "ImagingStudy", "subject": {"identifier": ID}}
    assert patient_links(img).identifiers == (frozenset({"urn:x|42"}),)
    # a contained Patient without identifier is an unknown patient
    anon = {"resourceType": "Observation", "contained": [{"resourceType": "Patient", "id": "x"}]}
    assert patient_links(anon).resolve({}) == {UNKNOWN}
    # typed to something else: no link
    assert patient_links({"resourceType": "Task", "for": {"type": "Device", "identifier": ID}}).identifiers == ()


def test_patient_and_primary():
    links = patient_links({"resourceType": "Patient", "id": "a", "link": [{"other": {"reference": "Patient/b"}}]})
    assert links.ids == {"a", "b"}
    assert primary_patient(frozenset({"a", "b"}), "a") == "a"
    assert primary_patient(frozenset({"x"}), None) == "x"
    assert primary_patient(frozenset({"x", UNKNOWN}), None) is None
    assert primary_patient(frozenset(), None) is None
    assert patient_links({"resourceType": "Organization", "partOf": {"reference": "Organization/o"}}).ids == set()
