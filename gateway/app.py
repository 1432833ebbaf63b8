"""The application factory: wiring only (settings → store → services → routes)."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.auth import TokenVerifier, jwks_ctx
from gateway.handlers import dicom_export as dicom_export_handlers
from gateway.handlers import dicomweb as dicomweb_handlers
from gateway.handlers import dimse as dimse_handlers
from gateway.handlers import federation as federation_handlers
from gateway.handlers import fhir as fhir_handlers
from gateway.handlers import health
from gateway.handlers import omop as omop_handlers
from gateway.handlers import inference as inference_handlers
from gateway.handlers import training as training_handlers
from gateway.handlers import ui as ui_handlers
from gateway.handlers import viewer as viewer_handlers
from gateway import metrics
from gateway.middlewares import auth_middleware, error_middleware
from gateway.edge import cors_middleware, cors_on_prepare, forwarded_middleware
from gateway.services.consent import ConsentGate, consent_ctx
from gateway.services.consent_report import ConsentReport
from gateway.services.audit import ChainedAudit, audit_ctx
from gateway.handlers import audit as audit_handlers
from gateway.services.deid import DeidPolicy
from gateway.handlers import bulk as bulk_handlers
from gateway.handlers import smart_auth as smart_auth_handlers
from gateway.services.fhir import FhirService
from gateway.services.validation import ModelValidator
from gateway.services.vocab import VocabService, vocab_ctx
from gateway.handlers import terminology as terminology_handlers
from gateway.services.workers import WorkerPool
from gateway.settings import Settings
from gateway.store import open_database
from gateway.store.access import AccessLayer

log = logging.getLogger(__name__)

#: ``app[keys.SERVICES][DEID]``: the site's :class:`~gateway.services.deid.DeidPolicy`.
DEID = "deid"


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    db = await open_database(settings, migrate=app[keys.STARTUP] != "serve")
    app[keys.DB] = db
    log.info("store ready", extra={"engine": db.dialect})
    workers = WorkerPool(settings.validation_processes)  # CPU-heavy pure work: validation, DICOM parsing
    app[keys.SERVICES]["workers"] = workers
    validator = ModelValidator(workers)
    app[keys.ACCESS] = AccessLayer(db, app[keys.GATE], app[keys.AUDIT])  # the one access layer (issue #19)
    app[keys.SERVICES]["vocab"] = VocabService(db)
    app[keys.SERVICES]["consent.report"] = ConsentReport(app[keys.ACCESS], app[keys.GATE])  # the console's consent view
    app[keys.FHIR] = FhirService(db, app[keys.GATE], app[keys.AUDIT], default_count=settings.default_page_size,
                                 max_count=settings.max_page_size, validator=validator, access=app[keys.ACCESS],
                                 cursor_key=settings.search_cursor_key())
    yield
    validator.close()
    await db.dispose()


def create_app(settings: Settings, *, startup: str = "all") -> web.Application:
    """Build the gateway application for ``settings`` (no I/O until the app starts).

    ``startup`` (see :data:`gateway.keys.STARTUP`): "all" for a lone server; ``fedgate serve`` with
    several processes runs the app once with "once" in the parent, then "serve" in every child."""
    if startup not in ("all", "once", "serve"):
        raise ValueError(f"startup: {startup!r}")
    app = web.Application(
        middlewares=[metrics.metrics_middleware, cors_middleware, forwarded_middleware, error_middleware,
                     auth_middleware],
        client_max_size=settings.max_body_bytes,
        # a request line up to 64 KiB reaches the routes, so an over-long id or query gets the protocol's
        # error form (OperationOutcome, ...) rather than aiohttp's plain-text 400 at 8 KiB (issue 20)
        handler_args={"max_line_size": 64 * 1024},
    )
    app[keys.SETTINGS] = settings
    app[keys.STARTUP] = startup
    app[keys.ERROR_RENDERERS] = {}
    app[keys.PUBLIC_ROUTES] = set()
    app[keys.SERVICES] = {}
    app[keys.VERIFIER] = TokenVerifier(settings)
    app[keys.GATE] = ConsentGate(settings)
    app[keys.AUDIT] = ChainedAudit(settings.site_id)
    app[keys.SERVICES][DEID] = DeidPolicy(settings)  # who gets de-identified data, with which keys (#24)
    app.on_response_prepare.append(cors_on_prepare)  # CORS headers on every response, errors included
    app.cleanup_ctx.append(jwks_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(vocab_ctx)  # before the gate: it reads the loaded disease ontologies
    app.cleanup_ctx.append(consent_ctx)
    app.cleanup_ctx.append(audit_ctx)
    health.setup_routes(app)
    audit_handlers.setup_routes(app)  # before the generic /fhir/{type} routes
    terminology_handlers.setup_routes(app)  # CodeSystem/$lookup, $subsumes, ValueSet/$expand
    bulk_handlers.setup_routes(app)  # Bulk Data $export (issue 24)
    smart_auth_handlers.setup_routes(app)  # SMART Backend Services token endpoint (issue 24)
    fhir_handlers.setup_routes(app)
    dicomweb_handlers.setup_routes(app)
    dicom_export_handlers.setup_routes(app)  # after dicomweb: its context needs the DICOMweb service
    dimse_handlers.setup(app)  # the DIMSE listener (dimse_port): after the DICOMweb service it uses
    federation_handlers.setup_routes(app)
    omop_handlers.setup_routes(app)
    inference_handlers.setup_routes(app)  # after dicomweb: its cleanup_ctx needs the DICOMweb service
    training_handlers.setup_routes(app)  # after federation (its config) and inference (deployment)
    viewer_handlers.setup_routes(app)  # the OHIF viewer at /viewer (static files + sign-in)
    ui_handlers.setup_routes(app)  # the web console at /ui (same sign-in as the viewer)
    metrics.setup_routes(app)  # last: its start-up wires the services built above
    return app


__all__ = ["create_app"]
