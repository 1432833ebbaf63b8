"""Typed codes of the audit trail: FHIR R4 AuditEvent ``action`` and ``outcome`` value sets and
the ``subtype`` (interaction) codes fedgate records.

They are :class:`enum.StrEnum`, so ``Action.READ == "R"``: an :class:`~gateway.services.access.AccessRecord`
built with the plain strings of older call sites still compares equal, and
:func:`gateway.services.audit.to_audit_event` coerces every record through these enums — a code outside them
(``"serach-type"``) is recorded as ``operation`` with a warning; an action or outcome outside the FHIR
value sets raises.
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """AuditEvent.action (http://hl7.org/fhir/audit-event-action)."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(StrEnum):
    """AuditEvent.outcome (http://hl7.org/fhir/audit-event-outcome)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # refused or not found: the request was answered with a 4xx
    SERIOUS_FAILURE = "8"  # the request failed on the server side (5xx)
    MAJOR_FAILURE = "12"


class Interaction(StrEnum):
    """AuditEvent.subtype: the FHIR restful interactions plus fedgate's own operations."""

    # FHIR restful-interaction
    READ = "read"
    VREAD = "vread"
    UPDATE = "update"
    PATCH = "patch"
    DELETE = "delete"
    HISTORY = "history"
    HISTORY_INSTANCE = "history-instance"
    HISTORY_TYPE = "history-type"
    HISTORY_SYSTEM = "history-system"
    CREATE = "create"
    SEARCH_TYPE = "search-type"
    SEARCH = "search-type"  # alias (the access layer's name for a type search)
    SEARCH_SYSTEM = "search-system"
    CAPABILITIES = "capabilities"
    TRANSACTION = "transaction"
    BATCH = "batch"
    OPERATION = "operation"
    EVERYTHING = "everything"  # Patient/{id}/$everything
    # DICOMweb
    QIDO_STUDIES = "qido-studies"
    QIDO_SERIES = "qido-series"
    QIDO_INSTANCES = "qido-instances"
    WADO = "wado"
    STOW = "stow"
    #: a DIMSE association (refused at A-ASSOCIATE, docs/dimse.md)
    DIMSE_ASSOCIATION = "dimse-association"
    # consent gate, exports, federation, inference, training
    ACCESS = "access"
    OMOP_EXPORT = "omop-export"
    OMOP_IMPORT = "omop-import"
    DICOM_EXPORT = "dicom-export"  # imaging cohort export, de-identified (issue #24)
    FEDERATION_COHORT = "federation-cohort"
    INFERENCE = "inference"
    INFERENCE_JOB = "inference-job"
    INFERENCE_MONITORING = "inference-monitoring"
    FEDERATED_TRAINING = "federated-training"
    TRAINING_MANIFEST = "training-manifest"
    TRAINING_RUN = "training-run"
    MODEL_DEPLOY = "model-deploy"
    # the web console (issue 28): the consent view's aggregates and decisions, audit-chain verification
    CONSENT_REPORT = "consent-report"
    CONSENT_DECISION = "consent-decision"
    AUDIT_VERIFY = "audit-verify"
    #: a request refused or failed before any service handled it (401, 403, 400, 404 on a route)
    REQUEST = "request"


__all__ = ["Action", "Interaction", "Outcome"]
