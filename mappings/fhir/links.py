"""Patient links of a FHIR resource: every patient whose data the resource carries (pure).

A resource belongs to every patient it references anywhere:

* every ``Reference`` element whose ``reference`` names a Patient (``Patient/x``, absolute URLs ending in
  ``Patient/x``, versioned ones), walking the whole resource — ``contained`` resources included;
* references by ``identifier`` only (``{"type": "Patient", "identifier": {...}}``, or untyped ones at an
  element of the R4 Patient CompartmentDefinition for the type, :data:`COMPARTMENT_ELEMENTS`): they are
  resolved by the store through Patient identifiers (:attr:`Links.identifiers`);
* contained Patients: their identifiers likewise (a contained Patient is some patient's data);
* a Patient itself, and the Patients its ``link`` names.

What cannot be resolved to a patient of this site is linked to :data:`UNKNOWN`, a patient with no consent:
research scopes never see it (fail closed).  A resource with no link (Organization, Medication, ...) stays
visible to every scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mappings.fhir.references import parse_reference

#: The link of what names a patient that cannot be resolved (no consent: hidden from research).
UNKNOWN = "?"

#: FHIR R4 (4.0.1) CompartmentDefinition/patient (its parameters: ``mappings.fhir.compartment``): resource
#: type → the top-level elements those parameters search (``Appointment.actor`` is ``participant.actor``,
#: ``Group.member`` is ``member.entity``, ...), from the parameters' expressions in the specification; used
#: to decide that an *untyped* identifier-only reference at such an element names a patient.
COMPARTMENT_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Account": ("subject",),
    "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "Appointment": ("participant",),
    "AppointmentResponse": ("actor",),
    "AuditEvent": ("agent", "entity"),
    "Basic": ("subject", "author"),
    "BodyStructure": ("patient",),
    "CarePlan": ("subject", "activity"),
    "CareTeam": ("subject", "participant"),
    "ChargeItem": ("subject",),
    "Claim": ("patient", "payee"),
    "ClaimResponse": ("patient",),
    "ClinicalImpression": ("subject",),
    "Communication": ("subject", "sender", "recipient"),
    "CommunicationRequest": ("subject", "sender", "recipient", "requester"),
    "Composition": ("subject", "author", "attester"),
    "Condition": ("subject", "asserter"),
    "Consent": ("patient",),
    "Coverage": ("policyHolder", "subscriber", "beneficiary", "payor"),
    "CoverageEligibilityRequest": ("patient",),
    "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",),
    "DeviceRequest": ("subject", "performer"),
    "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",),
    "DocumentManifest": ("subject", "author", "recipient"),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("subject",),
    "EnrollmentRequest": ("candidate",),
    "EpisodeOfCare": ("patient",),
    "ExplanationOfBenefit": ("patient", "payee"),
    "FamilyMemberHistory": ("patient",),
    "Flag": ("subject",),
    "Goal": ("subject",),
    "Group": ("member",),
    "ImagingStudy": ("subject",),
    "Immunization": ("patient",),
    "ImmunizationEvaluation": ("patient",),
    "ImmunizationRecommendation": ("patient",),
    "Invoice": ("subject", "recipient"),
    "List": ("subject", "source"),
    "MeasureReport": ("subject",),
    "Media": ("subject",),
    "MedicationAdministration": ("subject", "performer"),
    "MedicationDispense": ("subject", "receiver"),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "MolecularSequence": ("patient",),
    "NutritionOrder": ("patient",),
    "Observation": ("subject", "performer"),
    "Patient": ("link",),
    "Person": ("link",),
    "Procedure": ("subject", "performer"),
    "Provenance": ("target",),
    "QuestionnaireResponse": ("subject", "author"),
    "RelatedPerson": ("patient",),
    "RequestGroup": ("subject", "action"),
    "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",),
    "Schedule": ("actor",),
    "ServiceRequest": ("subject", "performer"),
    "Specimen": ("subject",),
    "SupplyDelivery": ("patient",),
    "SupplyRequest": ("deliverTo",),
    "VisionPrescription": ("patient",),
}

#: Keys a FHIR ``Reference`` element may carry: a dict whose keys are all among these and which has an
#: ``identifier`` object is an identifier reference.
_REFERENCE_KEYS = frozenset({"reference", "type", "identifier", "display", "id", "extension"})


@dataclass(frozen=True, slots=True)
class Links:
    """The patient links of one resource version, before identifier resolution."""

    #: Patient ids named by literal references (and the Patient's own id)
    ids: frozenset[str]
    #: "system|value" of identifier references to patients and of contained Patients' identifiers;
    #: each is one patient to resolve (a group of alternatives: any of them naming a patient resolves it)
    identifiers: tuple[frozenset[str], ...]
    #: something names a patient that can never be resolved (a contained Patient without identifier, ...)
    unknown: bool

    def resolve(self, found: dict[str, str]) -> frozenset[str]:
        """The link set once the store has resolved identifiers (``found``: "system|value" → patient id);
        what does not resolve becomes :data:`UNKNOWN`."""
        out = set(self.ids)
        for group in self.identifiers:
            hit = sorted({found[i] for i in group if i in found})
            out.update(hit) if hit else out.add(UNKNOWN)
        if self.unknown:
            out.add(UNKNOWN)
        return frozenset(out)


def _ident(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("value"), str) and value["value"]:
        system = value.get("system")
        return f"{system if isinstance(system, str) else ''}|{value['value']}"
    return None


def patient_links(resource: dict[str, Any]) -> Links:
    """Every patient ``resource`` references (see the module docstring)."""
    ids: set[str] = set()
    idents: list[frozenset[str]] = []
    unknown = False
    rtype = resource.get("resourceType")
    if rtype == "Patient" and isinstance(resource.get("id"), str):
        ids.add(resource["id"])
    compartment = COMPARTMENT_ELEMENTS.get(rtype, ())  # type: ignore[arg-type]

    def contained_patient(res: dict[Any, Any]) -> None:
        nonlocal unknown
        group = (
            frozenset(i for i in map(_ident, res.get("identifier") or ()) if i)
            if isinstance(res.get("identifier"), list)
            else frozenset()
        )
        if group:
            idents.append(group)
        else:
            unknown = True

    def visit(node: Any, top: str | None) -> None:
        nonlocal unknown
        if isinstance(node, list):
            for v in node:
                visit(v, top)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("reference")
        if isinstance(ref, str):
            # every form naming a Patient (relative, absolute, versioned) holds "Patient/": parse only those
            parsed = parse_reference(ref) if "Patient/" in ref else None
            if parsed is not None and parsed.type == "Patient":
                ids.add(parsed.id)
        elif isinstance(node.get("identifier"), dict) and node.keys() <= _REFERENCE_KEYS:
            rt = node.get("type")
            if rt == "Patient" or (rt is None and top in compartment):
                ident = _ident(node["identifier"])
                if ident:
                    idents.append(frozenset({ident}))
                else:
                    unknown = True
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                visit(v, k if top is None else top)

    for key, value in resource.items():
        if key == "contained" and isinstance(value, list):
            for res in value:
                if isinstance(res, dict):
                    if res.get("resourceType") == "Patient":
                        contained_patient(res)
                    inner = patient_links(
                        {k: v for k, v in res.items() if k != "id"} if res.get("resourceType") == "Patient" else res
                    )
                    ids.update(inner.ids)
                    idents.extend(inner.identifiers)
                    unknown = unknown or inner.unknown
        elif isinstance(value, (dict, list)):
            visit(value, key)
    return Links(frozenset(ids), tuple(idents), unknown)


def primary_patient(links: frozenset[str], compartment_patient: str | None) -> str | None:
    """The row's ``patient_id``: the compartment patient (subject/patient/beneficiary), else the only
    linked patient; None when the resource has no or several other links."""
    if compartment_patient is not None:
        return compartment_patient
    real = links - {UNKNOWN}
    return next(iter(real)) if len(real) == 1 and UNKNOWN not in links else None


__all__ = ["Links", "COMPARTMENT_ELEMENTS", "UNKNOWN", "patient_links", "primary_patient"]
