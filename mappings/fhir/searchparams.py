"""Search parameters the gateway indexes, as data (FHIR R4 §3.1.1 "Search", per-resource tables).

A path is a dotted walk over the JSON; ``x[x]`` matches every choice key ``xFoo``; a path may carry a
target type (``subject:Patient``) that restricts which references are indexed for the parameter.
``_id`` and ``_lastUpdated`` are columns of ``fhir_resource`` and apply to every type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str  # token | string | date | reference | quantity
    paths: tuple[str, ...]
    target: str | None = None  # for reference params restricted to one target type
    doc: str = ""


def _p(name: str, type_: str, *paths: str, target: str | None = None) -> SearchParam:
    return SearchParam(name, type_, tuple(paths), target)


_CLINICAL_COMMON = (
    _p("identifier", "token", "identifier"),
    _p("subject", "reference", "subject"),
    _p("patient", "reference", "subject", target="Patient"),
    _p("encounter", "reference", "encounter", target="Encounter"),
)

SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {}


def _register(res_type: str, *params: SearchParam) -> None:
    SEARCH_PARAMS[res_type] = {p.name: p for p in params}


_register(
    "Patient",
    _p("identifier", "token", "identifier"),
    _p("name", "string", "name"),
    _p("family", "string", "name.family"),
    _p("given", "string", "name.given"),
    _p("birthdate", "date", "birthDate"),
    _p("gender", "token", "gender"),
    _p("active", "token", "active"),
    _p("address", "string", "address"),
    _p("address-city", "string", "address.city"),
    _p("address-country", "string", "address.country"),
    _p("death-date", "date", "deceasedDateTime"),
    _p("general-practitioner", "reference", "generalPractitioner"),
    _p("organization", "reference", "managingOrganization", target="Organization"),
    _p("telecom", "token", "telecom"),
)
_register(
    "Observation",
    *_CLINICAL_COMMON,
    _p("code", "token", "code"),
    _p("category", "token", "category"),
    _p("status", "token", "status"),
    _p("date", "date", "effective[x]"),
    _p("value-quantity", "quantity", "valueQuantity"),
    _p("value-concept", "token", "valueCodeableConcept"),
    _p("component-code", "token", "component.code"),
    _p("performer", "reference", "performer"),
    _p("based-on", "reference", "basedOn"),
    _p("derived-from", "reference", "derivedFrom"),
    _p("has-member", "reference", "hasMember"),
)
_register(
    "Condition",
    *_CLINICAL_COMMON,
    _p("code", "token", "code"),
    _p("category", "token", "category"),
    _p("clinical-status", "token", "clinicalStatus"),
    _p("verification-status", "token", "verificationStatus"),
    _p("severity", "token", "severity"),
    _p("body-site", "token", "bodySite"),
    _p("onset-date", "date", "onset[x]"),
    _p("abatement-date", "date", "abatement[x]"),
    _p("recorded-date", "date", "recordedDate"),
)
_register(
    "Procedure",
    *_CLINICAL_COMMON,
    _p("code", "token", "code"),
    _p("category", "token", "category"),
    _p("status", "token", "status"),
    _p("date", "date", "performed[x]"),
    _p("performer", "reference", "performer.actor"),
    _p("reason-code", "token", "reasonCode"),
)
_register(
    "ImagingStudy",
    *_CLINICAL_COMMON,
    _p("status", "token", "status"),
    _p("started", "date", "started"),
    _p("modality", "token", "series.modality"),
    _p("bodysite", "token", "series.bodySite"),
    _p("series", "token", "series.uid"),
    _p("instance", "token", "series.instance.uid"),
    _p("endpoint", "reference", "endpoint", "series.endpoint"),
    _p("reason", "token", "reasonCode"),
    _p("referrer", "reference", "referrer"),
    _p("basedon", "reference", "basedOn"),
)
_register(
    "DiagnosticReport",
    *_CLINICAL_COMMON,
    _p("code", "token", "code"),
    _p("category", "token", "category"),
    _p("status", "token", "status"),
    _p("date", "date", "effective[x]"),
    _p("issued", "date", "issued"),
    _p("result", "reference", "result", target="Observation"),
    _p("imaging-study", "reference", "imagingStudy", target="ImagingStudy"),
    _p("conclusion", "token", "conclusionCode"),
    _p("performer", "reference", "performer"),
    _p("based-on", "reference", "basedOn"),
)
_register(
    "Consent",
    _p("identifier", "token", "identifier"),
    _p("patient", "reference", "patient", target="Patient"),
    _p("status", "token", "status"),
    _p("category", "token", "category"),
    _p("scope", "token", "scope"),
    _p("date", "date", "dateTime"),
    _p("period", "date", "provision.period"),
    _p("action", "token", "provision.action"),
    _p("purpose", "token", "provision.purpose"),
    _p("security-label", "token", "provision.securityLabel"),
    _p("policy-rule", "token", "policyRule"),
    _p("provision-code", "token", "provision.code", "provision.provision.code"),
    _p("organization", "reference", "organization"),
    _p("actor", "reference", "provision.actor.reference"),
    _p("data", "reference", "provision.data.reference"),
    _p("source-reference", "reference", "sourceReference"),
)
_register(
    "Organization",
    _p("identifier", "token", "identifier"),
    _p("name", "string", "name", "alias"),
    _p("type", "token", "type"),
    _p("active", "token", "active"),
    _p("partof", "reference", "partOf", target="Organization"),
    _p("address", "string", "address"),
)
_register(
    "Practitioner",
    _p("identifier", "token", "identifier"),
    _p("name", "string", "name"),
    _p("family", "string", "name.family"),
    _p("given", "string", "name.given"),
    _p("gender", "token", "gender"),
    _p("active", "token", "active"),
)
_register(
    "Encounter",
    *_CLINICAL_COMMON[:3],
    _p("status", "token", "status"),
    _p("class", "token", "class"),
    _p("type", "token", "type"),
    _p("date", "date", "period"),
    _p("participant", "reference", "participant.individual"),
    _p("reason-code", "token", "reasonCode"),
    _p("service-provider", "reference", "serviceProvider", target="Organization"),
)
_register(
    "AuditEvent",
    _p("type", "token", "type"),
    _p("subtype", "token", "subtype"),
    _p("action", "token", "action"),
    _p("outcome", "token", "outcome"),
    _p("date", "date", "recorded"),
    _p("agent", "reference", "agent.who"),
    _p("altid", "token", "agent.altId"),
    _p("entity", "reference", "entity.what"),
    _p("patient", "reference", "entity.what", target="Patient"),
    _p("purpose", "token", "purposeOfEvent"),
    _p("site", "token", "source.site"),
)

#: Types with a full parameter table (the CapabilityStatement lists these as searchable).
FULL_TYPES = tuple(SEARCH_PARAMS)

#: Parameters indexed for every other resource type (stored, readable, and searchable by these).
GENERIC_PARAMS: dict[str, SearchParam] = {
    p.name: p
    for p in (
        _p("identifier", "token", "identifier"),
        _p("subject", "reference", "subject"),
        _p("patient", "reference", "patient", "subject", target="Patient"),
    )
}

#: Parameters every type supports through ``fhir_resource`` columns or ``meta``.
COMMON_PARAMS: dict[str, SearchParam] = {
    "_id": _p("_id", "token", "id"),
    "_lastUpdated": _p("_lastUpdated", "date", "meta.lastUpdated"),
    "_tag": _p("_tag", "token", "meta.tag"),
}

#: Control parameters of the search interaction itself (not filters).
RESULT_PARAMS = frozenset(
    {
        "_count",
        "_sort",
        "_include",
        "_revinclude",
        "_summary",
        "_total",
        "_format",
        "_offset",
        "_pretty",
        "_elements",
        "_totalMethod",
        "_cursor",
    }
)


def params_for(res_type: str) -> dict[str, SearchParam]:
    """The indexed parameters of a type (type-specific table, or the generic set)."""
    return SEARCH_PARAMS.get(res_type, GENERIC_PARAMS)


def compartment_params(res_type: str) -> tuple[str, ...]:
    """Reference parameters that put a resource into a Patient's compartment."""
    if res_type == "Patient":
        return ()
    params = params_for(res_type)
    return tuple(n for n in ("patient", "subject") if n in params)
