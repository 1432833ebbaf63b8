"""The composition root: everything the gateway is made of, built here in dependency order.

``create_app`` builds what needs no I/O (settings, token verifier, consent gate, audit sink, metrics,
federation configuration), then registers one aiohttp cleanup context per service, in start order;
aiohttp runs them in that order at start-up and tears them down in reverse.  Each service is stored
under its own typed key in :mod:`gateway.keys`.  Handlers only declare routes and translate HTTP ↔
service calls (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import orjson
from aiohttp import web

from gateway import keys, metrics
from gateway.auth import TokenVerifier, jwks_ctx
from gateway.edge import cors_middleware, cors_on_prepare, forwarded_middleware
from gateway.handlers import audit as audit_handlers
from gateway.handlers import bulk as bulk_handlers
from gateway.handlers import dicom_export as dicom_export_handlers
from gateway.handlers import dicomweb as dicomweb_handlers
from gateway.handlers import federation as federation_handlers
from gateway.handlers import fhir as fhir_handlers
from gateway.handlers import health
from gateway.handlers import inference as inference_handlers
from gateway.handlers import omop as omop_handlers
from gateway.handlers import smart_auth as smart_auth_handlers
from gateway.handlers import terminology as terminology_handlers
from gateway.handlers import training as training_handlers
from gateway.handlers import ui as ui_handlers
from gateway.handlers import viewer as viewer_handlers
from gateway.handlers.dimse import DimseListener, peers_from
from gateway.middlewares import auth_middleware, error_middleware
from gateway.services.audit import ChainedAudit, audit_ctx
from gateway.services.backend_auth import BackendAuth
from gateway.services.bulk import BulkExportService, ExportConfig
from gateway.services.consent import ConsentGate, consent_ctx
from gateway.services.consent_report import ConsentReport
from gateway.services.deid import DeidPolicy
from gateway.services.dicom_export import DicomExportJobs, DicomExportService
from gateway.services.dicomweb import DicomwebService
from gateway.services.federation import FederationConfig, HubService, HubTokenVerifier, SiteService, hub_private_key
from gateway.services.fhir import FhirService
from gateway.services.inference import InferenceConfig, InferenceService
from gateway.services.omop import OmopService
from gateway.services.training import SiteTrainer, TrainingConfig
from gateway.services.training_hub import TrainingHub
from gateway.services.validation import ModelValidator
from gateway.services.vocab import VocabService, vocab_ctx
from gateway.services.workers import WorkerPool
from gateway.settings import Settings
from gateway.store import open_database
from gateway.store.access import AccessLayer
from gateway.store.blobs import BlobStore

log = logging.getLogger(__name__)


def _section(app: web.Application, name: str) -> dict:
    """The TOML section ``[name]`` of the settings (``Settings.extra``), or ``{}``."""
    raw = app[keys.SETTINGS].extra.get(name) or {}
    return dict(raw) if isinstance(raw, dict) else {}


# ------------------------------------------------------------------ start-up contexts, in start order


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The database (migrated unless this is a serving child), then the CPU worker pool."""
    db = await open_database(app[keys.SETTINGS], migrate=app[keys.STARTUP] != "serve")
    app[keys.DB] = db
    log.info("store ready", extra={"engine": db.dialect})
    app[keys.WORKERS] = WorkerPool(app[keys.SETTINGS].validation_processes)
    yield
    await db.dispose()


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one access layer (after a test may have replaced the gate), vocabularies, FHIR, the console's consent
    reports and the SMART Backend Services token issuer."""
    settings = app[keys.SETTINGS]
    validator = ModelValidator(app[keys.WORKERS])
    app[keys.ACCESS] = AccessLayer(app[keys.DB], app[keys.GATE], app[keys.AUDIT])
    app[keys.VOCAB] = VocabService(app[keys.DB])
    app[keys.FHIR] = FhirService(app[keys.DB], app[keys.GATE], app[keys.AUDIT], default_count=settings.default_page_size,
                                 max_count=settings.max_page_size, validator=validator, access=app[keys.ACCESS],
                                 cursor_key=settings.search_cursor_key())
    app[keys.CONSENT_REPORT] = ConsentReport(app[keys.ACCESS], app[keys.GATE])
    app[keys.BACKEND_AUTH] = BackendAuth(settings, app[keys.DB])
    yield
    validator.close()


async def dicomweb_ctx(app: web.Application) -> AsyncIterator[None]:
    """DICOMweb over the blob store (it owns the STOW part writer threads); repairs what an earlier
    process left half stored."""
    settings = app[keys.SETTINGS]
    svc = DicomwebService(app[keys.DB], app[keys.ACCESS], app[keys.AUDIT],
                          BlobStore(Path(settings.data_dir) / "blobs"), app[keys.WORKERS])
    if app[keys.STARTUP] != "serve":  # not in a serving child: its siblings' temp files are in flight
        await svc.reconcile()
    else:  # a serving child (perhaps replacing one that died): what a dead sibling left half stored
        await svc.adopt_dead_journals()
    app[keys.DICOMWEB] = svc
    try:
        yield
    finally:
        await svc.close()  # (the STOW part writer threads)


async def dimse_ctx(app: web.Application) -> AsyncIterator[None]:
    """The DIMSE listener (``dimse_port``; pynetdicom's threads call the DICOMweb service on this loop)."""
    settings = app[keys.SETTINGS]
    app[keys.DIMSE] = None
    if not settings.dimse_port or app[keys.STARTUP] == "once":
        yield
        return
    listener = DimseListener(settings, app[keys.DICOMWEB], app[keys.AUDIT], asyncio.get_running_loop())
    # a serving process of several: the parent listens and hands each connection to one of them
    await asyncio.to_thread(listener.start, app[keys.STARTUP] == "serve")
    app[keys.DIMSE] = listener
    try:
        yield
    finally:
        await asyncio.to_thread(listener.stop)


async def export_ctx(app: web.Application) -> AsyncIterator[None]:
    """Research exports, de-identified by the site's policy: FHIR Bulk Data ``$export`` and the imaging cohort
    export (leased, resumable jobs; a worker of each in every serving process)."""
    settings = app[keys.SETTINGS]
    config = ExportConfig.from_extra(_section(app, "export"))
    bulk = BulkExportService(app[keys.DB], app[keys.ACCESS], settings.data_dir, config,
                             deid_secret=settings.deid_key(), site_id=settings.site_id, workers=app[keys.WORKERS],
                             policy=app[keys.DEID])
    app[keys.BULK_EXPORT] = bulk
    dicom = app[keys.DICOM_EXPORT] = DicomExportService(app[keys.DICOMWEB], app[keys.DEID], app[keys.AUDIT])
    jobs = DicomExportJobs(app[keys.DB], dicom, settings.data_dir, lease_s=config.lease_s, poll_s=config.poll_s)
    app[keys.DICOM_EXPORT_JOBS] = jobs
    tasks = ([asyncio.create_task(bulk.worker()), asyncio.create_task(jobs.worker())]
             if config.worker and app[keys.STARTUP] != "once" else [])
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def federation_ctx(app: web.Application) -> AsyncIterator[None]:
    """The site side of federated counts, and the hub (with its HTTP client) when this gateway is one."""
    settings, cfg = app[keys.SETTINGS], app[keys.FEDERATION_CONFIG]
    app[keys.FEDERATION_SITE] = SiteService(settings, cfg, app[keys.DB], expand=app[keys.CODE_EXPANDER])
    if not cfg.is_hub:
        app[keys.FEDERATION_HUB] = None
        yield
        return
    connector = aiohttp.TCPConnector(limit=100, limit_per_host=16)
    async with aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode()) as session:
        app[keys.FEDERATION_HUB] = HubService(settings, cfg, session)
        yield


async def omop_ctx(app: web.Application) -> AsyncIterator[None]:
    app[keys.OMOP] = OmopService(app[keys.DB], vocab_path=_section(app, "omop").get("vocabulary"), policy=app[keys.DEID])
    yield


async def inference_ctx(app: web.Application) -> AsyncIterator[None]:
    """The inference backend (Triton/KServe v2 or embedded torch), the service and its job worker."""
    from inference.backends import RetryPolicy, make_backend
    from inference.repository import DEFAULT_REPOSITORY

    cfg = _section(app, "inference")
    retry = RetryPolicy(attempts=int(cfg.get("retry_attempts", 5)), timeout_s=float(cfg.get("timeout_s", 30)))
    backend = make_backend(cfg.get("url") or None, str(cfg.get("protocol", "grpc")),
                           Path(cfg.get("repository") or DEFAULT_REPOSITORY), retry, str(cfg.get("device", "cpu")))
    svc = InferenceService(app[keys.DB], app[keys.GATE], app[keys.AUDIT], backend,
                           app[keys.DICOMWEB], app[keys.FHIR], InferenceConfig.from_extra(cfg))
    app[keys.INFERENCE] = svc
    startup = app[keys.STARTUP]
    if cfg.get("register_shipped", True) and startup != "serve":
        await svc.register_shipped()
    # jobs are claimed with leases in the store, so every serving process may run a worker
    task = asyncio.create_task(svc.worker()) if cfg.get("worker", True) and startup != "once" else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await backend.close()


async def training_ctx(app: web.Application) -> AsyncIterator[None]:
    """The site trainer (its model repository added to the inference backend), and the hub when this is one."""
    settings, fcfg, tcfg = app[keys.SETTINGS], app[keys.FEDERATION_CONFIG], TrainingConfig.from_settings(app[keys.SETTINGS])
    app[keys.TRAINING_SITE] = SiteTrainer(settings, tcfg, app[keys.DB], app[keys.GATE], app[keys.AUDIT],
                                            app[keys.CODE_EXPANDER])
    inference = app[keys.INFERENCE]
    if hasattr(inference.backend, "add_repository"):
        inference.backend.add_repository(tcfg.repository_path(settings))
    if not fcfg.is_hub:
        app[keys.TRAINING_HUB] = None
        yield
        return
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100, limit_per_host=8)) as session:
        hub = TrainingHub(settings, tcfg, fcfg, app[keys.DB], session, hub_private_key(settings, fcfg), app[keys.AUDIT])
        app[keys.TRAINING_HUB] = hub
        # runs are claimed with leases in the store, so every serving process may run a worker; stopped, it
        # hands its runs back to the queue (before the HTTP session closes)
        task = asyncio.create_task(hub.worker()) if app[keys.STARTUP] != "once" else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ------------------------------------------------------------------------------------ the application


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
        # error form (OperationOutcome, ...) rather than aiohttp's plain-text 400 at 8 KiB
        handler_args={"max_line_size": 64 * 1024},
    )
    app[keys.SETTINGS] = settings
    app[keys.STARTUP] = startup
    app[keys.ERROR_RENDERERS] = {}
    app[keys.PUBLIC_ROUTES] = set()

    # built now (no I/O); a test may replace the gate or the audit sink before the app starts
    app[keys.VERIFIER] = TokenVerifier(settings)
    app[keys.GATE] = ConsentGate(settings)
    app[keys.AUDIT] = ChainedAudit(settings.site_id)
    app[keys.DEID] = DeidPolicy(settings)
    app[keys.METRICS] = metrics.Metrics.for_settings(settings)
    app[keys.CODE_EXPANDER] = None
    fcfg = app[keys.FEDERATION_CONFIG] = FederationConfig.from_settings(settings)
    app[keys.HUB_TOKENS] = HubTokenVerifier.from_config(settings, fcfg)
    peers_from(settings)  # a wrong DIMSE peer table fails here, naming the setting

    # built at start-up, in this order; torn down in reverse
    app.cleanup_ctx.append(jwks_ctx)  # a JWKS given by URL, fetched once
    app.cleanup_ctx.append(store_ctx)  # DB, WORKERS
    app.cleanup_ctx.append(core_ctx)  # ACCESS, VOCAB, FHIR
    app.cleanup_ctx.append(vocab_ctx)  # configured vocabularies loaded; before the gate: it reads the disease ontologies
    app.cleanup_ctx.append(consent_ctx)  # the gate started on the store
    app.cleanup_ctx.append(audit_ctx)  # the audit chain's flusher
    app.cleanup_ctx.append(dicomweb_ctx)  # DICOMWEB
    app.cleanup_ctx.append(dimse_ctx)  # DIMSE (needs DICOMWEB)
    app.cleanup_ctx.append(export_ctx)  # BULK_EXPORT, DICOM_EXPORT, DICOM_EXPORT_JOBS (need ACCESS, DICOMWEB, DEID)
    app.cleanup_ctx.append(federation_ctx)  # FEDERATION_SITE, FEDERATION_HUB
    app.cleanup_ctx.append(omop_ctx)  # OMOP
    app.cleanup_ctx.append(inference_ctx)  # INFERENCE (needs DICOMWEB, FHIR)
    app.cleanup_ctx.append(training_ctx)  # TRAINING_SITE, TRAINING_HUB (needs INFERENCE)
    app.cleanup_ctx.append(metrics.metrics_ctx)  # last: wires the observers of the services above

    app.on_response_prepare.append(cors_on_prepare)  # CORS headers on every response, errors included
    if startup != "once":  # (the supervising parent's one-time start-up app serves nothing)
        app.on_shutdown.append(metrics.log_stopping)

    # routes
    health.setup_routes(app)
    audit_handlers.setup_routes(app)  # before the generic /fhir/{type} routes
    terminology_handlers.setup_routes(app)  # CodeSystem/$lookup, $subsumes, ValueSet/$expand
    bulk_handlers.setup_routes(app)  # Bulk Data $export, before the generic /fhir/{type} routes
    smart_auth_handlers.setup_routes(app)  # SMART Backend Services token endpoint
    fhir_handlers.setup_routes(app)
    dicomweb_handlers.setup_routes(app)
    dicom_export_handlers.setup_routes(app)
    federation_handlers.setup_routes(app)
    omop_handlers.setup_routes(app)
    inference_handlers.setup_routes(app)
    training_handlers.setup_routes(app)
    viewer_handlers.setup_routes(app)  # the OHIF viewer at /viewer (static files + sign-in)
    ui_handlers.setup_routes(app)  # the web console at /ui (same sign-in as the viewer)
    metrics.setup_routes(app)  # GET /metrics
    return app


__all__ = ["create_app"]
