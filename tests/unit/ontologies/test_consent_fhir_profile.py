"""FHIR Consent → DUO entry (docs/consent.md, "Accepted Consent profile") and site policy parsing."""

from __future__ import annotations

import pytest

from mappings.fhir.consent_duo import (
    INVALID_PERMISSION,
    PolicyError,
    effective,
    entry_from_consent,
    parse_policy,
    profile_key,
)

DUO = "http://purl.obolibrary.org/obo/duo"
EXT = "https://fedgate.dev/fhir/StructureDefinition/duo-"


def consent(**over):
    res = {"resourceType": "Consent", "id": "c1", "status": "active", "patient": {"reference": "Patient/p1"},
           "policyRule": {"coding": [{"system": DUO, "code": "DUO:0000007"}]},
           "provision": {"type": "permit", "period": {"start": "2024-01-01", "end": "2030-12-31"},
                         "code": [{"coding": [{"system": DUO, "code": "0000046"}]},
                                  {"coding": [{"system": "http://purl.obolibrary.org/obo/mondo", "code": "MONDO:0004992"}]},
                                  {"coding": [{"system": "http://snomed.info/sct", "code": "363346000"}]}]}}
    res.update(over)
    return res


def test_ds_ncu_with_diseases_and_period():
    e = entry_from_consent(consent())
    assert e.profile.permission == "DUO:0000007"
    assert e.profile.modifiers == {"DUO:0000046"}
    assert e.profile.diseases == {"MONDO:0004992", "SCTID:363346000"}
    assert (e.start, e.end) == ("2024-01-01", "2030-12-31")
    assert e.active_on("2026-01-01") and not e.active_on("2031-01-01") and not e.active_on("2023-12-31")


@pytest.mark.parametrize("status", ["inactive", "rejected", "draft", "proposed", "entered-in-error"])
def test_only_active_consents_count(status):
    assert entry_from_consent(consent(status=status)) is None


def test_opt_out_and_no_duo_terms():
    assert entry_from_consent(consent(provision={"type": "deny"})) is False
    assert entry_from_consent(consent(policyRule={"coding": [{"system": "http://x", "code": "y"}]}, provision={})) is None


def test_iri_codes_in_purpose_and_parameters_as_extensions():
    res = consent(policyRule=None, provision={
        "purpose": [{"code": "http://purl.obolibrary.org/obo/DUO_0000042"}],
        "code": [{"coding": [{"system": DUO, "code": c}]} for c in ("DUO:0000024", "DUO:0000025", "DUO:0000022")],
        "period": {"start": "2025-02-01"}},
        extension=[{"url": EXT + "moratorium-until", "valueDate": "2026-06-01"},
                   {"url": EXT + "time-limit-months", "valueInteger": 12},
                   {"url": EXT + "region", "valueString": "DE"}, {"url": EXT + "region", "valueCode": "FR"}])
    e = entry_from_consent(res)
    assert e.profile.permission == "DUO:0000042"
    assert e.profile.modifiers == {"DUO:0000024", "DUO:0000025", "DUO:0000022"}
    p = e.profile.parameters
    assert (str(p.moratorium_until), p.time_limit_months, str(p.granted_on)) == ("2026-06-01", 12, "2025-02-01")
    assert p.regions == {"DE", "FR"}


def test_zero_or_two_permissions_fail_closed():
    two = consent(provision={"purpose": [{"system": DUO, "code": "DUO:0000042"}, {"system": DUO, "code": "DUO:0000006"}]})
    assert entry_from_consent(two).profile.permission == INVALID_PERMISSION
    none = consent(policyRule={"coding": [{"system": DUO, "code": "DUO:0000021"}]}, provision={})
    assert entry_from_consent(none).profile.permission == INVALID_PERMISSION
    bad = consent(extension=[{"url": EXT + "time-limit-months", "valueInteger": -3}])
    assert entry_from_consent(bad).profile.permission == INVALID_PERMISSION


def test_equal_consents_share_one_effective_profile_key():
    a = effective([entry_from_consent(consent(id="a"))], False)
    b = effective([entry_from_consent(consent(id="b", patient={"reference": "Patient/p2"}))], False)
    assert profile_key(a) == profile_key(b)
    assert effective([entry_from_consent(consent())], True) is None
    assert effective([], False) is None


def test_policy_parsing_and_matching():
    cols = parse_policy({"collections": [{"name": "retro", "match": {"identifier_system": "urn:x", "sex": ["female"],
                                                                     "born_from": 1950},
                                          "consent": {"permission": "DUO:0000006"}}]})
    c = cols[0]
    assert c.matches(["urn:x|1"], "female", 1960)
    assert not c.matches(["urn:y|1"], "female", 1960)
    assert not c.matches(["urn:x|1"], "male", 1960)
    assert not c.matches(["urn:x|1"], "female", 1940)
    with pytest.raises(PolicyError, match=r"collections\[0\]\.match"):
        parse_policy({"collections": [{"name": "all", "consent": {"permission": "DUO:0000042"}}]})
    with pytest.raises(PolicyError, match=r"collections\[0\]\.consent\.permission"):
        parse_policy({"collections": [{"name": "x", "match": {"sex": ["male"]}, "consent": {}}]})
