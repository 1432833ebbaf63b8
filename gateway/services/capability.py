"""The CapabilityStatement (FHIR R4 §3.1.0.13): generated from the same tables the server uses,
so it tells the truth about what is supported."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.settings import Settings
from mappings.fhir.searchparams import COMMON_PARAMS, FULL_TYPES, GENERIC_PARAMS, SEARCH_PARAMS

INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create",
                "search-type"]
OTHER_TYPES = (
    "Claim", "ExplanationOfBenefit", "Immunization", "MedicationRequest", "CarePlan", "CareTeam", "Endpoint",
    "Media", "DocumentReference", "ServiceRequest", "Provenance", "ResearchStudy", "ResearchSubject", "Group",
    "Location", "Device", "AllergyIntolerance", "MedicationAdministration", "Goal", "Specimen",
)


#: FHIR terminology operations served from the vocabulary store (gateway/handlers/terminology.py).
TERMINOLOGY_OPS = {"CodeSystem": ("lookup", "subsumes"), "ValueSet": ("expand",)}


def _params(params) -> list[dict[str, Any]]:
    out = [{"name": n, "type": "token" if n == "_id" else "date" if n == "_lastUpdated" else sp.type}
           for n, sp in COMMON_PARAMS.items()]
    out += [{"name": sp.name, "type": sp.type} for sp in params.values()]
    return out


def _oauth_uris(settings: Settings) -> dict[str, Any]:
    """The SMART oauth-uris extension when the issuer's endpoints are configured (also in
    /.well-known/smart-configuration)."""
    if not (settings.smart_authorize_url and settings.smart_token_url):
        return {}
    return {"extension": [{
        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
        "extension": [{"url": "authorize", "valueUri": settings.smart_authorize_url},
                      {"url": "token", "valueUri": settings.smart_token_url}]}]}


def capability_statement(settings: Settings, base: str) -> dict[str, Any]:
    resources = []
    for rtype in FULL_TYPES + OTHER_TYPES:
        params = SEARCH_PARAMS.get(rtype, GENERIC_PARAMS)
        ref_params = [p.name for p in params.values() if p.type == "reference"]
        resources.append({
            "type": rtype,
            "interaction": [{"code": c} for c in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "not-supported",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "local"],
            "searchInclude": [f"{rtype}:{p}" for p in ref_params],
            "searchRevInclude": [f"{src}:{p.name}" for src, ps in SEARCH_PARAMS.items() for p in ps.values()
                                 if p.type == "reference" and p.target in (rtype, None) and p.name in ("patient", "subject")],
            "searchParam": _params(params),
            **({"operation": [{"name": "everything",
                               "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
                              {"name": "export",  # Bulk Data IG v2 (docs/bulk-export.md)
                               "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]}
               if rtype == "Patient" else
               {"operation": [{"name": "export",
                               "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]}
               if rtype == "Group" else {}),
        })
    # terminology operations over the vocabulary store (docs/vocab.md)
    for rtype, ops in TERMINOLOGY_OPS.items():
        entry = next((r for r in resources if r["type"] == rtype), None)
        if entry is None:
            entry = {"type": rtype}
            resources.append(entry)
        entry["operation"] = [{"name": n, "definition": f"http://hl7.org/fhir/OperationDefinition/{rtype}-{n}"}
                              for n in ops]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "publisher": settings.organization,
        "kind": "instance",
        "software": {"name": "fedgate", "version": __version__},
        "implementation": {"description": f"fedgate site {settings.site_id}", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": (
                "FHIR R4 over JSON. DICOMweb (PS3.18) is served at ../dicomweb (STOW-RS, QIDO-RS, WADO-RS). "
                "Conditional update/delete are supported inside transaction Bundles. Search: strict handling "
                "(unknown parameters → 400) unless Prefer: handling=lenient; modifiers :missing (all types), "
                ":not, :below, :above (token; subsumption through the loaded vocabularies), :exact/:contains (string); "
                "CodeSystem/$lookup, CodeSystem/$subsumes, ValueSet/$expand for the loaded code systems; _sort, _count, _include, _revinclude, _summary=count, "
                "_total=none|estimate|accurate: the default is estimate, which counts nothing — Bundle.total is given "
                "only on the page that reaches the end of the matches; _total=accurate counts them on every page. "
                "Paging: next links carry an opaque _cursor (keyset paging, bound to the search and the requester); "
                "_offset is also accepted. Bearer JWT required on every interaction except metadata."
            ),
            "security": {
                "cors": bool(settings.cors_origin_list),
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "OAuth", "display": "OAuth"}]},
                            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}]}],
                **_oauth_uris(settings),
                "description": "Bearer JWT (HS256 dev secret or RS256/ES256 via JWKS); DUO consent gate on every read.",
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"},
                            {"code": "search-system"}],
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}],
        }],
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
    }
