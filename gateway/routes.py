"""How each route is protected: every route is declared, by name, here.

* ``PUBLIC`` — no authentication, no patient data (health, OpenAPI, FHIR CapabilityStatement).
* ``SELF_AUTH`` — the handler authenticates the caller itself (federation site endpoints: a hub's signed
  token or an analyst token) and then asks the consent gate like a gated route.
* ``GATED`` — a bearer token is required (``auth_middleware``) and every request that reaches patient data
  asks the consent gate for its scope (``AccessLayer.open`` / ``Gate.scope_for``): no scope, no query.
* ``NO_PATIENT_DATA`` — a bearer token is required; the route returns no patient record (writes that answer
  with identifiers only, model cards, job/run bookkeeping, the admin-only audit trail, the hub's fan-out —
  each site gates its own answer).

``tests/integration/test_route_access.py`` walks the router: every route must be declared here, public and
self-authenticating ones are exactly :data:`keys.PUBLIC_ROUTES`, and with a recording gate every ``GATED``
route is shown to call the gate (and every ``SELF_AUTH`` one too, once authenticated).  A new route that is
not declared fails that test — declare it here.
"""

from __future__ import annotations

PUBLIC, SELF_AUTH, GATED, NO_PATIENT_DATA = "public", "self-auth", "gated", "no-patient-data"

ROUTE_ACCESS: dict[str, str] = {
    # health & metadata
    "healthz": PUBLIC, "readyz": PUBLIC, "openapi": PUBLIC, "fhir.metadata": PUBLIC,
    "metrics": PUBLIC,  # aggregate counters only
    # OHIF viewer: the static app and its login page (data comes through the gated DICOMweb routes)
    "viewer": PUBLIC, "viewer-files": PUBLIC, "viewer-config": PUBLIC, "viewer-login": PUBLIC,
    "viewer-dev-token": SELF_AUTH,  # checks the login itself, issues a token
    # web console (issue 28): pages are data-free shells, fragments call the services with the signed-in user
    "ui.root": PUBLIC, "ui": PUBLIC, "ui.page": PUBLIC, "ui.static": PUBLIC,
    "ui.consent": GATED, "ui.consent_decision": GATED, "ui.models": GATED,  # consent report, inference jobs
    "ui.cohort": NO_PATIENT_DATA,  # the hub's fan-out: each site gates its own answer
    "ui.monitoring": NO_PATIENT_DATA, "ui.training": NO_PATIENT_DATA,  # as inference.monitoring, training.*
    "ui.audit": NO_PATIENT_DATA, "ui.audit_verify": NO_PATIENT_DATA,  # admin-only audit trail
    "fhir.smart_configuration": PUBLIC, "smart_configuration": PUBLIC,
    "auth.token": SELF_AUTH,  # SMART Backend Services: checks the client's signed assertion, issues a token
    # terminology operations (vocabularies, no patient data)
    **{f"fhir.{op}{post}": NO_PATIENT_DATA for op in ("codesystem_lookup", "codesystem_subsumes", "valueset_expand")
       for post in ("", "_post")},
    # FHIR
    "fhir.audit_search": NO_PATIENT_DATA, "fhir.audit_read": NO_PATIENT_DATA,  # admin-only audit trail
    "fhir.bundle": GATED, "fhir.bundle_slash": GATED,
    "fhir.history_system": GATED, "fhir.history_type": GATED, "fhir.history_instance": GATED,
    "fhir.search": GATED, "fhir.search_post": GATED, "fhir.read": GATED, "fhir.vread": GATED,
    "fhir.search_system": GATED, "fhir.search_system_slash": GATED, "fhir.search_compartment": GATED,
    "fhir.everything": GATED, "fhir.patch": GATED,  # (PATCH answers with the whole patched resource)
    # Bulk Data export (issue 24): kick-offs open the requester's access; the status/cancel routes answer with
    # the job's bookkeeping (counts, file URLs) to the requester who started it; the files are patient data
    **{f"fhir.export{lvl}{post}": GATED for lvl in ("", "_patient", "_group") for post in ("", "_post")},
    "fhir.export_status": NO_PATIENT_DATA, "fhir.export_cancel": NO_PATIENT_DATA, "fhir.export_file": GATED,
    # writes answer with what was sent (conditional forms ask the gate: fhir service)
    "fhir.create": NO_PATIENT_DATA, "fhir.update": NO_PATIENT_DATA, "fhir.delete": NO_PATIENT_DATA,
    # DICOMweb
    "dicomweb.stow": NO_PATIENT_DATA, "dicomweb.stow_study": NO_PATIENT_DATA,  # answers with the UIDs sent
    **{f"dicomweb.{n}": GATED for n in (
        "search_studies", "search_series", "search_instances", "search_study_series", "search_study_instances",
        "search_series_instances", "retrieve_study", "retrieve_series", "retrieve_instance", "metadata_study",
        "metadata_series", "metadata_instance", "frames", "rendered_study", "rendered_series",
        "rendered_instance", "rendered_frames", "thumbnail_study", "thumbnail_series", "thumbnail_instance",
        "bulkdata")},
    # federation
    "federation.count": SELF_AUTH, "federation.stats": SELF_AUTH,
    "federation.query": NO_PATIENT_DATA, "federation.sites": NO_PATIENT_DATA,  # hub: sites gate their answers
    "federation.train_round": SELF_AUTH, "federation.train_key": SELF_AUTH, "federation.deploy": SELF_AUTH,
    # OMOP
    "omop.export": GATED, "omop.load": NO_PATIENT_DATA,  # import: a write, answers with counts
    # imaging cohort export (issue #24): reads through the gated WADO path; status: the requester's own jobs
    "export.dicom_start": GATED, "export.dicom_status": GATED,
    # inference
    "inference.register_model": NO_PATIENT_DATA, "inference.list_models": NO_PATIENT_DATA,
    "inference.submit_job": GATED, "inference.list_jobs": GATED, "inference.get_job": GATED,
    "inference.monitoring": NO_PATIENT_DATA,
    # training
    "training.start": NO_PATIENT_DATA, "training.list": NO_PATIENT_DATA, "training.get": NO_PATIENT_DATA,
    "training.cancel": NO_PATIENT_DATA, "training.models": NO_PATIENT_DATA, "training.model_file": NO_PATIENT_DATA,
    "training.deploy": NO_PATIENT_DATA, "training.site_manifests": GATED,
}


def access_of(route_name: str | None) -> str | None:
    """The declared protection of a route (None: not declared — treated as GATED by the middleware)."""
    return ROUTE_ACCESS.get(route_name or "")


__all__ = ["PUBLIC", "SELF_AUTH", "GATED", "NO_PATIENT_DATA", "ROUTE_ACCESS", "access_of"]
