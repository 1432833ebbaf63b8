"""Typed application keys (aiohttp ``web.AppKey``): one per service the composition root builds.

Everything the gateway is made of is reached through these names, e.g. ``request.app[keys.DICOMWEB]``.
``gateway/app.py`` sets each of them, in dependency order (docs/ARCHITECTURE.md lists them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from aiohttp import web

if TYPE_CHECKING:  # pragma: no cover
    from gateway.auth import TokenVerifier
    from gateway.metrics import Metrics
    from gateway.services.access import AuditSink, Gate
    from gateway.handlers.dimse import DimseListener
    from gateway.services.backend_auth import BackendAuth
    from gateway.services.bulk import BulkExportService
    from gateway.services.consent_report import ConsentReport
    from gateway.services.deid import DeidPolicy
    from gateway.services.dicom_export import DicomExportJobs, DicomExportService
    from gateway.services.dicomweb import DicomwebService
    from gateway.services.federation import Expander, FederationConfig, HubService, HubTokenVerifier, SiteService
    from gateway.services.fhir import FhirService
    from gateway.services.inference import InferenceService
    from gateway.services.omop import OmopService
    from gateway.services.training import SiteTrainer
    from gateway.services.training_hub import TrainingHub
    from gateway.services.vocab import VocabService
    from gateway.services.workers import WorkerPool
    from gateway.settings import Settings
    from gateway.store.access import AccessLayer
    from gateway.store.db import Database

# --- configuration and process role (set by create_app, before anything starts)
SETTINGS: web.AppKey["Settings"] = web.AppKey("settings")
#: Which start-up work this process does (``fedgate serve --processes N``): "all" (a lone server: everything),
#: "once" (the supervising parent: migrations, blob reconcile, consent policy, shipped model cards; no
#: background tasks, serves nothing) or "serve" (a serving child: the parent did the one-time work).
STARTUP: web.AppKey[str] = web.AppKey("startup")
#: path prefix → renderer(request, GatewayError) → Response; the error middleware picks the longest match.
ERROR_RENDERERS: web.AppKey[dict[str, Callable[..., web.StreamResponse]]] = web.AppKey("error_renderers")
#: Route names that need no authentication (everything else is gated; a test walks the router).
PUBLIC_ROUTES: web.AppKey[set[str]] = web.AppKey("public_routes")

# --- built by create_app (no I/O); a test may replace GATE or AUDIT before the app starts
VERIFIER: web.AppKey["TokenVerifier"] = web.AppKey("verifier")
#: Who gets identified or de-identified data, with which project keys (docs/deidentification.md).
DEID: web.AppKey["DeidPolicy"] = web.AppKey("deid")
GATE: web.AppKey["Gate"] = web.AppKey("gate")
AUDIT: web.AppKey["AuditSink"] = web.AppKey("audit")
#: The application's Prometheus metrics (gateway/metrics.py).
METRICS: web.AppKey["Metrics"] = web.AppKey("metrics")
#: Descendant expansion for cohort queries, a function ``(system, code) → codes`` (None: a code matches itself);
#: set it after create_app, before the app starts.
CODE_EXPANDER: web.AppKey["Expander | None"] = web.AppKey("code_expander")
FEDERATION_CONFIG: web.AppKey["FederationConfig"] = web.AppKey("federation_config")
#: Verifies hub → site tokens (the self-authenticating federation and training site routes).
HUB_TOKENS: web.AppKey["HubTokenVerifier"] = web.AppKey("federation_hub_tokens")

# --- built at start-up by the cleanup contexts of gateway/app.py, in this order
DB: web.AppKey["Database"] = web.AppKey("db")
#: Process pool for CPU-heavy pure work (validation, DICOM parsing).
WORKERS: web.AppKey["WorkerPool"] = web.AppKey("workers")
#: The one access layer: every read of patient data gets its query builder from it.
ACCESS: web.AppKey["AccessLayer"] = web.AppKey("access")
VOCAB: web.AppKey["VocabService"] = web.AppKey("vocab")
FHIR: web.AppKey["FhirService"] = web.AppKey("fhir")
#: The console's consent reports (purpose x profile matrix, withdrawals, one patient's decision).
CONSENT_REPORT: web.AppKey["ConsentReport"] = web.AppKey("consent_report")
#: SMART Backend Services token endpoint (client credentials with a signed assertion).
BACKEND_AUTH: web.AppKey["BackendAuth"] = web.AppKey("backend_auth")
DICOMWEB: web.AppKey["DicomwebService"] = web.AppKey("dicomweb")
#: The DIMSE listener (None unless ``dimse_port`` is set and this process serves).
DIMSE: web.AppKey["DimseListener | None"] = web.AppKey("dimse")
#: FHIR Bulk Data ``$export`` jobs (docs/bulk-export.md).
BULK_EXPORT: web.AppKey["BulkExportService"] = web.AppKey("bulk_export")
#: Imaging cohort export (de-identified, to a folder or a DICOMweb server) and its persisted jobs.
DICOM_EXPORT: web.AppKey["DicomExportService"] = web.AppKey("dicom_export")
DICOM_EXPORT_JOBS: web.AppKey["DicomExportJobs"] = web.AppKey("dicom_export_jobs")
FEDERATION_SITE: web.AppKey["SiteService"] = web.AppKey("federation_site")
#: None unless this gateway has the hub role (``[federation] role = "hub"``).
FEDERATION_HUB: web.AppKey["HubService | None"] = web.AppKey("federation_hub")
OMOP: web.AppKey["OmopService"] = web.AppKey("omop")
INFERENCE: web.AppKey["InferenceService"] = web.AppKey("inference")
TRAINING_SITE: web.AppKey["SiteTrainer"] = web.AppKey("training_site")
#: None unless this gateway has the hub role.
TRAINING_HUB: web.AppKey["TrainingHub | None"] = web.AppKey("training_hub")
