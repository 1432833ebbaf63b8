"""FHIR R4 resource JSON → common model objects (pure).

Only the types of the common model are projected; anything else returns ``[]``.  Observation
components become their own Observation rows (``parent_id`` = the panel) so blood-pressure parts are
queryable like any other measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mappings import model as m
from mappings.fhir.index import compartment_patient
from mappings.fhir.references import parse_reference

#: Preferred code systems for a concept's primary coding, most preferred first.
PREFERRED_SYSTEMS = (
    "http://snomed.info/sct",
    "http://loinc.org",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://hl7.org/fhir/sid/icd-10",
    "http://hl7.org/fhir/sid/icd-10-cm",
)

RACE_EXT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_EXT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"


def concept(cc: Any) -> m.Concept:
    """A CodeableConcept (or Coding) as a :class:`~mappings.model.Concept`."""
    if not isinstance(cc, dict):
        return m.Concept(None)
    codings_json = cc.get("coding") if "coding" in cc else ([cc] if "code" in cc else [])
    codings = tuple(
        m.Code(c.get("system"), str(c["code"]), c.get("display"))
        for c in codings_json or ()
        if isinstance(c, dict) and c.get("code") is not None
    )
    primary = None
    for system in PREFERRED_SYSTEMS:
        primary = next((c for c in codings if c.system == system), None)
        if primary:
            break
    if primary is None and codings:
        primary = codings[0]
    return m.Concept(primary, codings, cc.get("text"))


def _first_concept(value: Any) -> m.Concept:
    if isinstance(value, list):
        return concept(value[0]) if value else m.Concept(None)
    return concept(value)


def _choice(res: dict[Any, Any], stem: str) -> tuple[str | None, str | None]:
    """(start, end) of a dateTime/Period/instant choice element ``stem[x]``."""
    for suffix in ("DateTime", "Instant", "Date"):
        if f"{stem}{suffix}" in res:
            return res[f"{stem}{suffix}"], None
    period = res.get(f"{stem}Period")
    if isinstance(period, dict):
        return period.get("start"), period.get("end")
    return None, None


def _ref_id(value: Any, rtype: str) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        ref = parse_reference(value["reference"])
        if ref and ref.type == rtype:
            return ref.id
    return None


def _source(res: dict[Any, Any]) -> m.Source:
    return m.Source("fhir", f"{res['resourceType']}/{res.get('id')}")


def _patient(res: dict[Any, Any]) -> list[m.ModelObject]:
    identifiers = tuple(f"{i.get('system') or ''}|{i['value']}" for i in res.get("identifier") or () if i.get("value"))
    race = eth = None
    for ext in res.get("extension") or ():
        if ext.get("url") in (RACE_EXT, ETHNICITY_EXT):
            code = next(
                (
                    e.get("valueCoding", {}).get("code")
                    for e in ext.get("extension") or ()
                    if e.get("url") == "ombCategory"
                ),
                None,
            )
            if ext["url"] == RACE_EXT:
                race = code
            else:
                eth = code
    deceased = res.get("deceasedDateTime")
    return [
        m.Patient(
            _source(res),
            res.get("id"),  # type: ignore[arg-type]
            identifiers,
            res.get("birthDate"),
            res.get("gender"),
            deceased,
            race,
            eth,
        )
    ]


def _encounter(res: dict[Any, Any]) -> list[m.ModelObject]:
    period = res.get("period") or {}
    cls = res.get("class") or {}
    return [
        m.Encounter(
            _source(res),
            compartment_patient(res),
            cls.get("code"),
            _first_concept(res.get("type")),
            period.get("start"),
            period.get("end"),
        )
    ]


def _condition(res: dict[Any, Any]) -> list[m.ModelObject]:
    onset, _ = _choice(res, "onset")
    abatement, _ = _choice(res, "abatement")
    status = concept(res.get("clinicalStatus")).primary
    return [
        m.Condition(
            _source(res),
            compartment_patient(res),
            concept(res.get("code")),
            onset,
            abatement,
            status.code if status else None,
            _ref_id(res.get("encounter"), "Encounter"),
        )
    ]


def _observation(res: dict[Any, Any]) -> list[m.ModelObject]:
    pid = compartment_patient(res)
    effective, _ = _choice(res, "effective")
    category = _first_concept(res.get("category")).primary
    enc = _ref_id(res.get("encounter"), "Encounter")
    src = _source(res)

    def one(node: dict[Any, Any], source: m.Source, parent: str | None) -> m.Observation:
        q = node.get("valueQuantity") or {}
        vc = concept(node.get("valueCodeableConcept")).primary if "valueCodeableConcept" in node else None
        value_num = q.get("value") if isinstance(q.get("value"), (int, float)) else None
        if value_num is None and isinstance(node.get("valueInteger"), int):
            value_num = node["valueInteger"]
        return m.Observation(
            source,
            pid,
            concept(node.get("code")),
            category.code if category else None,
            float(value_num) if value_num is not None else None,
            q.get("code") or q.get("unit"),
            vc,
            node.get("valueString"),
            effective,
            res.get("status"),
            enc,
            parent,
        )

    out: list[m.ModelObject] = [one(res, src, None)]
    for i, comp in enumerate(res.get("component") or ()):
        out.append(one(comp, m.Source("fhir", f"{src.id}#component{i}"), src.id))
    return out


def _procedure(res: dict[Any, Any]) -> list[m.ModelObject]:
    start, end = _choice(res, "performed")
    return [
        m.Procedure(
            _source(res),
            compartment_patient(res),
            concept(res.get("code")),
            start,
            end,
            res.get("status"),
            _ref_id(res.get("encounter"), "Encounter"),
        )
    ]


def _diagnostic_report(res: dict[Any, Any]) -> list[m.ModelObject]:
    effective, _ = _choice(res, "effective")
    studies = tuple(r["reference"] for r in res.get("imagingStudy") or () if isinstance(r, dict) and r.get("reference"))
    return [
        m.DiagnosticReport(
            _source(res),
            compartment_patient(res),
            concept(res.get("code")),
            effective,
            res.get("status"),
            studies,
            res.get("conclusion"),
        )
    ]


def _imaging_study(res: dict[Any, Any]) -> list[m.ModelObject]:
    uid = next(
        (
            i["value"][8:] if i.get("value", "").startswith("urn:oid:") else i.get("value")
            for i in res.get("identifier") or ()
            # R4 ImagingStudy: system urn:dicom:uid; Synthea writes urn:ietf:rfc:3986 + an urn:oid: value
            if i.get("system") == "urn:dicom:uid"
            or (i.get("system") == "urn:ietf:rfc:3986" and str(i.get("value", "")).startswith("urn:oid:"))
        ),
        None,
    )
    modalities = sorted(
        {c["code"] for c in res.get("modality") or () if c.get("code")}
        | {s["modality"]["code"] for s in res.get("series") or () if s.get("modality", {}).get("code")}
    )
    return [
        m.ImagingStudy(
            _source(res),
            compartment_patient(res),
            uid,
            res.get("started"),
            tuple(modalities),
            res.get("description"),
            res.get("numberOfSeries"),
            res.get("numberOfInstances"),
        )
    ]


def _consent(res: dict[Any, Any]) -> list[m.ModelObject]:
    provision = res.get("provision") or {}
    period = provision.get("period") or {}
    return [
        m.Consent(
            _source(res),
            _ref_id(res.get("patient"), "Patient"),
            res.get("status"),
            period.get("start"),
            period.get("end"),
            res.get("dateTime"),
            None,
        )
    ]


PROJECTORS: dict[str, Callable[[dict[Any, Any]], list[m.ModelObject]]] = {
    "Patient": _patient,
    "Encounter": _encounter,
    "Condition": _condition,
    "Observation": _observation,
    "Procedure": _procedure,
    "DiagnosticReport": _diagnostic_report,
    "ImagingStudy": _imaging_study,
    "Consent": _consent,
}


def project(resource: dict[str, Any]) -> list[m.ModelObject]:
    """Common-model objects for a FHIR resource (empty for types outside the common model)."""
    fn = PROJECTORS.get(resource.get("resourceType", ""))
    return fn(resource) if fn else []
