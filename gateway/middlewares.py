"""The gateway's middlewares: request logging, authentication, and the one error middleware.

The error middleware is the only place that catches broad exceptions: domain errors become the
protocol's error form (FHIR OperationOutcome, DICOMweb status + reasons, problem+json), anything
unexpected becomes a logged 500 without PHI.
"""

from __future__ import annotations

import logging
import time
import uuid

import orjson
from aiohttp import web

from gateway import keys
from gateway.auth import PURPOSE_HEADER
from gateway.context import Requester
from gateway.errors import STATUS_ERRORS, Forbidden, GatewayError, Unauthorized
from gateway.request_audit import refusal_record
from gateway.services import audit as audit_service

log = logging.getLogger(__name__)

REQUESTER: web.RequestKey["Requester"] = web.RequestKey("requester", object)  # the authenticated Requester


def route_template(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "<unmatched>"


def problem_response(request: web.Request, exc: GatewayError) -> web.Response:
    """RFC 9457 problem details (routes outside FHIR and DICOMweb)."""
    body = {"type": "about:blank", "title": exc.title, "status": exc.status, "detail": exc.message}
    if exc.expression:
        body["fields"] = exc.expression
    return web.Response(status=exc.status, body=orjson.dumps(body), content_type="application/problem+json",
                        headers=exc.headers)


def _render(request: web.Request, exc: GatewayError) -> web.StreamResponse:
    renderers = request.app[keys.ERROR_RENDERERS]
    best = ""
    for prefix in renderers:
        if request.path.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return renderers[best](request, exc) if best in renderers else problem_response(request, exc)


def _from_http(exc: web.HTTPException) -> GatewayError:
    cls = STATUS_ERRORS.get(exc.status, GatewayError)
    msg = {404: "no such route", 405: f"method {exc.reason} not allowed on this route"}.get(exc.status, exc.reason or exc.text or "")
    if exc.status == 413:
        msg = "request body exceeds the configured limit"
    if exc.status == 405:
        msg = "method not allowed on this route"
    err = cls(msg, status=exc.status)
    for h in ("Allow",):
        if h in exc.headers:
            err.headers[h] = exc.headers[h]
    return err


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    answered = False  # false when the handler was cancelled (the client went away): nothing to audit here
    audit_token = audit_service.begin_request()
    try:
        resp = await handler(request)
        status, answered = resp.status, True
        return resp
    except GatewayError as exc:
        status, answered = exc.status, True
        return _render(request, exc)
    except web.HTTPException as exc:
        status, answered = exc.status, True
        if exc.status < 400:
            raise
        return _render(request, _from_http(exc))
    except Exception as exc:  # the one place that turns bugs into a 500
        answered = True
        # no exception message, no traceback values: both can quote the request's data (a PN value, SQL with
        # its parameters); the frames (file, line, function) locate the bug
        log.error("unhandled error", extra={"route": route_template(request), "method": request.method,
                                            "error_type": type(exc).__name__, "where": safe_frames(exc)})
        return _render(request, GatewayError("internal error; see server log", status=500))
    finally:
        try:
            if answered and status >= 400:
                # refused or failed, and no service recorded it with what it named: the trail still gets it
                rec = refusal_record(request, status, request.get(REQUESTER), route_template(request))
                if not audit_service.request_recorded_failure(rec.resources, rec.patients):
                    await request.app[keys.AUDIT].record(rec)
        except Exception as exc:  # the response is made; the events stay queued for the flusher
            log.warning("audit of a refused request deferred", extra={"error_type": type(exc).__name__})
        finally:
            audit_service.end_request(audit_token)
        log.info("request", extra={"route": route_template(request), "method": request.method, "status": status,
                                   "duration_ms": round((time.perf_counter() - start) * 1000, 2)})


def safe_frames(exc: BaseException, limit: int = 12) -> str:
    """Where ``exc`` was raised: ``file:line function`` of its innermost frames — no message, no values."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1] if '/' in f.filename else f.filename}:{f.lineno} {f.name}"
                       for f in reversed(frames))


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Verify the bearer token on every route except the explicit public list."""
    route = request.match_info.route
    if route.name in request.app[keys.PUBLIC_ROUTES] or request.match_info.http_exception is not None:
        return await handler(request)
    settings = request.app[keys.SETTINGS]
    if settings.auth_mode == "none":
        from gateway.context import SYSTEM

        request[REQUESTER] = SYSTEM
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token", headers={"WWW-Authenticate": 'Bearer realm="fedgate"'})
    try:
        requester = request.app[keys.VERIFIER].verify(header[7:].strip(), request.headers.get(PURPOSE_HEADER))
    except Unauthorized as exc:
        exc.headers.setdefault("WWW-Authenticate", 'Bearer realm="fedgate", error="invalid_token"')
        raise
    check_scope_route(requester, request.path)
    request[REQUESTER] = requester
    return await handler(request)


def check_scope_route(requester: Requester, path: str) -> None:
    """What SMART scopes rule out before any handler runs: a token bound to one patient (``patient/``
    scopes) reaches the FHIR and DICOMweb APIs only (the gate narrows both to its patient; federation,
    training, inference, OMOP and the console are not bound by it, so they are refused); a token whose
    scopes name resource types reaches DICOMweb only when they grant ImagingStudy."""
    if requester.patient is not None and not path.startswith(("/fhir/", "/dicomweb/")) and path not in (
            "/fhir", "/dicomweb"):
        raise Forbidden("a SMART patient/ token reads the patient's FHIR and DICOMweb data only")
    if requester.resource_types is not None and path.startswith("/dicomweb") \
            and "ImagingStudy" not in requester.resource_types:
        raise Forbidden("DICOMweb needs a SMART scope granting ImagingStudy (e.g. patient/ImagingStudy.read)")


def requester_of(request: web.Request) -> Requester:
    return request[REQUESTER]


def request_id() -> str:
    return uuid.uuid4().hex[:16]
