"""Prometheus metrics at ``/metrics`` (``prometheus-client``), the way the servers beside fedgate expose them.

What is measured (labels never carry patient data: route *templates*, methods, status codes, outcome words,
configured site ids):

* ``fedgate_http_requests_total{method,route,status}`` and ``fedgate_http_request_duration_seconds{method,route}``
* ``fedgate_stow_instances_total{outcome}`` (stored | duplicate | failed) and ``fedgate_stow_bytes_total``
  — STOW-RS and ``fedgate import`` (the same path)
* ``fedgate_consent_decisions_total{outcome}`` (unrestricted | restricted | refused) — the consent gate
* ``fedgate_audit_backlog`` — audit events accepted but not yet written to the chain (this process)
* ``fedgate_inference_jobs{state}`` — the persisted inference job queue (read at scrape time)
* ``fedgate_federation_round_trip_seconds{site,status}`` — hub → site cohort queries
* ``fedgate_build_info{version,engine}``

Each application has its own registry (tests run several in one process). With ``fedgate serve --processes N``
the serving processes share a ``prometheus_client`` multiprocess directory (set up by the parent before they
start: :func:`prepare_multiprocess_dir`) and a scrape, answered by any of them, adds up all processes.

Access (setting ``metrics``): ``protected`` (default) — a bearer token that is either the ``metrics_token``
setting (for a Prometheus scraper: ``bearer_token_file``) or a gateway token with the admin or site role;
``open`` — no authentication (a scrape port behind a firewall); ``off`` — 404.
"""

from __future__ import annotations

import hmac
import logging
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import __version__, keys
from gateway.errors import Forbidden, NotFound, Unauthorized

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MODES = ("protected", "open", "off")
METRICS_ROLES = ("admin", "site")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The metric objects of one application, and the callbacks the services report through."""

    @classmethod
    def for_settings(cls, settings: Any) -> "Metrics":
        """The metrics of an application with ``settings`` (whose ``metrics`` mode is checked here)."""
        if settings.metrics not in MODES:
            from gateway.settings import SettingsError

            raise SettingsError(f"setting 'metrics': {settings.metrics!r} is not one of {', '.join(MODES)}")
        return cls()

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("fedgate_http_requests", "HTTP requests answered",
                                ("method", "route", "status"), registry=r)
        self.latency = Histogram("fedgate_http_request_duration_seconds", "HTTP request latency",
                                 ("method", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self.stow_instances = Counter("fedgate_stow_instances", "DICOM instances received (STOW-RS, import)",
                                      ("outcome",), registry=r)
        self.stow_bytes = Counter("fedgate_stow_bytes", "bytes of DICOM instances stored", registry=r)
        self.consent = Counter("fedgate_consent_decisions", "consent gate decisions", ("outcome",), registry=r)
        self.round_trip = Histogram("fedgate_federation_round_trip_seconds", "hub to site cohort query round trips",
                                    ("site", "status"), buckets=LATENCY_BUCKETS, registry=r)
        self.info = Gauge("fedgate_build_info", "fedgate version and store engine", ("version", "engine"),
                          registry=r, multiprocess_mode="max")
        #: requests being answered now by this process (logged when it stops: drained requests)
        self.in_flight = 0
        #: scrape-time readers: name → async callable returning {labels tuple: value}
        self.scrape_readers: dict[str, tuple[str, tuple[str, ...], Callable[[], Any]]] = {}

    # ------------------------------------------------------------------ callbacks the services call
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_stow(self, stored: int, duplicate: int, failed: int, stored_bytes: int) -> None:
        for outcome, n in (("stored", stored), ("duplicate", duplicate), ("failed", failed)):
            if n:
                self.stow_instances.labels(outcome).inc(n)
        if stored_bytes:
            self.stow_bytes.inc(stored_bytes)

    def observe_consent(self, outcome: str) -> None:
        self.consent.labels(outcome).inc()

    def observe_round_trip(self, site: str, status: str, seconds: float) -> None:
        self.round_trip.labels(site, status).observe(seconds)

    def add_scrape_gauge(self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], Any]) -> None:
        """A gauge read when scraped: ``read()`` (async) returns {label values tuple: value}."""
        self.scrape_readers[name] = (doc, labels, read)

    # ------------------------------------------------------------------ exposition
    async def render(self) -> bytes:
        families = []
        for name, (doc, labels, read) in self.scrape_readers.items():
            fam = GaugeMetricFamily(name, doc, labels=list(labels))
            try:
                values = await read()
            except Exception as exc:  # a failed reading must not fail the whole scrape
                log.warning("metrics: reading a gauge failed", extra={"metric": name, "error_type": type(exc).__name__})
                continue
            for key, value in sorted(values.items()):
                fam.add_metric(list(key), value)
            families.append(fam)
        registry = CollectorRegistry()
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)
        else:
            registry.register(_Forward(self.registry))
        registry.register(_Static(families))
        return generate_latest(registry)


class _Forward:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        return self.registry.collect()


class _Static:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """A fresh multiprocess directory for ``fedgate serve --processes N`` (set in the environment the serving
    processes inherit; the parent serves no requests)."""
    d = Path(data_dir) / "metrics"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(d.resolve())
    return d


def process_gone(pid: int) -> None:
    """A serving process exited: its live gauges no longer count (its counters stay summed)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Outermost: every answer counted with its route template, errors and refusals included."""
    import time

    from gateway.middlewares import route_template

    start = time.perf_counter()
    status = 500
    m = request.app.get(keys.METRICS)
    if m is not None:
        m.in_flight += 1
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if m is not None:
            m.in_flight -= 1
            m.observe_request(request.method, route_template(request), status, time.perf_counter() - start)


async def metrics_handler(request: web.Request) -> web.Response:
    settings = request.app[keys.SETTINGS]
    if settings.metrics == "off":
        raise NotFound("metrics are switched off (setting 'metrics')")
    if settings.metrics == "protected":
        _authorize(request, settings)
    body = await request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _authorize(request: web.Request, settings) -> None:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        raise Unauthorized("metrics need a bearer token: the metrics_token setting, or an admin/site token",
                           headers={"WWW-Authenticate": 'Bearer realm="fedgate-metrics"'})
    token = header[7:].strip()
    if settings.metrics_token and hmac.compare_digest(token.encode(), settings.metrics_token.encode()):
        return
    requester = request.app[keys.VERIFIER].verify(token, None)  # raises Unauthorized
    if not requester.has_role(*METRICS_ROLES):
        raise Forbidden("metrics are for the admin and site roles (or the metrics_token)")


def setup_routes(app: web.Application) -> None:
    # authenticated in the handler (its own token), not by the auth middleware
    app.router.add_get("/metrics", metrics_handler, name="metrics")
    app[keys.PUBLIC_ROUTES].add("metrics")


async def log_stopping(app: web.Application) -> None:
    """Graceful stop begins: no new connections; the requests still in flight are finished (drained)."""
    log.info("stopping", extra={"in_flight": app[keys.METRICS].in_flight})


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Once the store and services are up: wire the services' observers and the scrape-time gauges."""
    m = app[keys.METRICS]
    db = app[keys.DB]
    m.info.labels(__version__, db.dialect).set(1)
    gate = app[keys.GATE]
    if hasattr(gate, "observer"):
        gate.observer = m.observe_consent
    audit = app[keys.AUDIT]
    if hasattr(audit, "backlog"):
        async def backlog() -> dict:
            return {(): audit.backlog}

        m.add_scrape_gauge("fedgate_audit_backlog", "audit events not yet written to the chain (this process)",
                           (), backlog)

    async def jobs() -> dict:
        from gateway.store.jobs_schema import job_counts

        async with db.read() as conn:
            return {(state,): n for state, n in (await job_counts(conn)).items()}

    m.add_scrape_gauge("fedgate_inference_jobs", "inference jobs by state", ("state",), jobs)
    app[keys.DICOMWEB].metrics_observer = m
    hub = app[keys.FEDERATION_HUB]
    if hub is not None:
        hub.metrics_observer = m
    yield


__all__ = ["Metrics", "log_stopping", "metrics_ctx", "metrics_middleware", "prepare_multiprocess_dir", "process_gone", "setup_routes"]
