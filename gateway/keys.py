"""Typed application keys (aiohttp ``web.AppKey``) for everything the app factory wires."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

if TYPE_CHECKING:  # pragma: no cover
    from gateway.auth import TokenVerifier
    from gateway.metrics import Metrics
    from gateway.services.access import AuditSink, Gate
    from gateway.services.fhir import FhirService
    from gateway.settings import Settings
    from gateway.store.db import Database
    from gateway.store.access import AccessLayer

SETTINGS: web.AppKey["Settings"] = web.AppKey("settings")
DB: web.AppKey["Database"] = web.AppKey("db")
VERIFIER: web.AppKey["TokenVerifier"] = web.AppKey("verifier")
GATE: web.AppKey["Gate"] = web.AppKey("gate")
AUDIT: web.AppKey["AuditSink"] = web.AppKey("audit")
FHIR: web.AppKey["FhirService"] = web.AppKey("fhir")
#: The one access layer (gateway.store.access.AccessLayer): every read of patient data gets its query
#: builder from it (issue #19).  Built in the store context, after the gate may have been replaced.
ACCESS: web.AppKey["AccessLayer"] = web.AppKey("access")
#: path prefix → renderer(request, GatewayError) → Response; the error middleware picks the longest match.
ERROR_RENDERERS: web.AppKey[dict[str, Callable[..., web.StreamResponse]]] = web.AppKey("error_renderers")
#: Route names that need no authentication (everything else is gated; a test walks the router).
PUBLIC_ROUTES: web.AppKey[set[str]] = web.AppKey("public_routes")
#: Services added by later components (dicomweb, federation, inference, ...), by name.
SERVICES: web.AppKey[dict[str, Any]] = web.AppKey("services")
#: Which start-up work this process does (``fedgate serve --processes N``): "all" (a lone server: everything),
#: "once" (the supervising parent: migrations, blob reconcile, consent policy, shipped model cards; no
#: background tasks, serves nothing) or "serve" (a serving child: the parent did the one-time work).
STARTUP: web.AppKey[str] = web.AppKey("startup")
#: The application's Prometheus metrics (gateway/metrics.py).
METRICS: web.AppKey["Metrics"] = web.AppKey("metrics")
