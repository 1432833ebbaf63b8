"""The AuditEvent of a request that was refused or failed before (or without) a service recording it
("every request that touches patient data or is refused leaves an AuditEvent with the patients
it concerned").

The error middleware calls :func:`refusal_record` for every response with status ≥ 400 for which nothing
recorded a failure while the request was served (401 from authentication, 403 from a role check, 400 from
input validation, 404/410, a route that does not exist, a 500).  The record is PHI-free: the route
*template*, the status, the resources and the patient ids the request itself named (its path and its
patient-valued search parameters) — never the query string, a header value or the error message (which may
quote the request's values).  Nothing is looked up in the store (no query of patient data outside the access
layer): a refused ``GET /fhir/Observation/x`` names ``Observation/x``; its patient is found by joining the
trail with the resource's links, by an admin who may.
"""

from __future__ import annotations

from aiohttp import web

from gateway.context import Requester
from gateway.services.access import AccessRecord
from gateway.services.audit_codes import Action, Interaction, Outcome

ANONYMOUS = Requester("anonymous")
MAX_REFS = 20

#: Search parameters whose value names a patient (FHIR R4 Patient compartment and the common
#: patient/subject references) and DICOM's PatientID (QIDO).
_PATIENT_PARAMS = ("patient", "subject", "beneficiary", "individual", "for", "PatientID", "00100020")

_INTERACTIONS: dict[str, Interaction] = {
    "fhir.read": Interaction.READ, "fhir.vread": Interaction.VREAD, "fhir.search": Interaction.SEARCH_TYPE,
    "fhir.search_post": Interaction.SEARCH_TYPE, "fhir.history_instance": Interaction.HISTORY,
    "fhir.history_type": Interaction.HISTORY, "fhir.history_system": Interaction.HISTORY,
    "fhir.create": Interaction.CREATE, "fhir.update": Interaction.UPDATE, "fhir.patch": Interaction.PATCH,
    "fhir.delete": Interaction.DELETE, "fhir.bundle": Interaction.TRANSACTION,
    "fhir.bundle_slash": Interaction.TRANSACTION, "fhir.audit_search": Interaction.SEARCH_TYPE,
    "fhir.audit_read": Interaction.READ, "fhir.search_system": Interaction.SEARCH_SYSTEM,
    "fhir.search_system_slash": Interaction.SEARCH_SYSTEM, "fhir.search_compartment": Interaction.SEARCH_TYPE,
    "fhir.everything": Interaction.EVERYTHING, "omop.load": Interaction.OMOP_IMPORT,
    "dicomweb.search_studies": Interaction.QIDO_STUDIES,
    "dicomweb.search_series": Interaction.QIDO_SERIES, "dicomweb.search_study_series": Interaction.QIDO_SERIES,
    "dicomweb.search_instances": Interaction.QIDO_INSTANCES,
    "dicomweb.search_study_instances": Interaction.QIDO_INSTANCES,
    "dicomweb.search_series_instances": Interaction.QIDO_INSTANCES,
}


def _interaction(name: str) -> Interaction:
    if name in _INTERACTIONS:
        return _INTERACTIONS[name]
    if name.startswith("dicomweb.stow"):
        return Interaction.STOW
    if name.startswith("dicomweb."):
        return Interaction.WADO
    if name.startswith("federation.train") or name == "federation.deploy":
        return Interaction.FEDERATED_TRAINING
    if name.startswith("federation."):
        return Interaction.FEDERATION_COHORT
    if name.startswith("inference."):
        return Interaction.INFERENCE_JOB
    if name.startswith("training."):
        return Interaction.TRAINING_RUN
    if name.startswith("omop."):
        return Interaction.OMOP_EXPORT
    return Interaction.REQUEST


def _action(method: str, interaction: Interaction) -> Action:
    if interaction in (Interaction.SEARCH_TYPE, Interaction.SEARCH_SYSTEM, Interaction.EVERYTHING,
                       Interaction.TRANSACTION, Interaction.FEDERATION_COHORT,
                       Interaction.QIDO_STUDIES, Interaction.QIDO_SERIES, Interaction.QIDO_INSTANCES,
                       Interaction.OMOP_EXPORT, Interaction.REQUEST):
        return Action.EXECUTE
    return {"POST": Action.CREATE, "PUT": Action.UPDATE, "PATCH": Action.UPDATE,
            "DELETE": Action.DELETE}.get(method, Action.READ)


def _patient_ref(value: str) -> str | None:
    """``Patient/x`` / ``x`` / ``http://base/Patient/x`` -> ``x``; another type's reference -> None."""
    value = value.strip()
    if "/" in value:
        parts = value.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient":
            return parts[-1] or None
        if len(parts) >= 4 and parts[-4] == "Patient" and parts[-2] == "_history":
            return parts[-3] or None
        return None
    return value or None


def concerned(request: web.Request) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(resources, patient ids) the request named: its path and its patient-valued query parameters."""
    info = request.match_info
    resources: list[str] = []
    patients: list[str] = []
    rtype, rid = info.get("type"), info.get("id")
    if request.path.startswith("/fhir/AuditEvent"):
        rtype = "AuditEvent"
    if request.match_info.route.name in ("fhir.everything", "fhir.search_compartment"):
        rtype = "Patient"  # /fhir/Patient/{id}/$everything, /fhir/Patient/{id}/{type}: the id is the patient's
    if rtype and rid:
        resources.append(f"{rtype}/{rid}")
        if rtype == "Patient":
            patients.append(rid)
    study = info.get("study")
    if study:
        resources.append(f"ImagingStudy/{study}")
    for name, value in request.query.items():
        base = name.split(":", 1)[0].split(".", 1)[0]
        if base in _PATIENT_PARAMS:
            for v in value.split(","):
                p = v.strip() if base in ("PatientID", "00100020") else _patient_ref(v)
                if p:
                    patients.append(p)
        elif base == "_id" and rtype == "Patient":
            patients += [v.strip() for v in value.split(",") if v.strip()]
    dedup = lambda xs: tuple(dict.fromkeys(xs))[:MAX_REFS]
    return dedup(resources), dedup(patients)


def refusal_record(request: web.Request, status: int, requester: Requester | None, route: str) -> AccessRecord:
    name = request.match_info.route.name or ""
    interaction = _interaction(name)
    resources, patients = concerned(request)
    outcome = Outcome.MINOR_FAILURE if status < 500 else Outcome.SERIOUS_FAILURE
    return AccessRecord(requester or ANONYMOUS, _action(request.method, interaction), interaction, outcome,
                        resources, patients, detail=f"HTTP {status} {request.method} {route}", path=route)


__all__ = ["ANONYMOUS", "concerned", "refusal_record"]
