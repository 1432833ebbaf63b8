"""Inference routes (docs/inference.md): model cards and jobs, problem+json errors.

- ``POST /inference/models`` (admin) register a model card; ``GET /inference/models`` list cards
- ``POST /inference/jobs`` {model, version?, study, series?} → 202 with the job(s); ``GET /inference/jobs[?state=&study=]``;
  ``GET /inference/jobs/{job}``

Site settings (TOML section ``[inference]``): ``url`` (Triton/KServe v2 server, host:port; empty = embedded torch),
``protocol`` (grpc|http), ``repository`` (model repository path), ``device`` (cpu|cuda), ``timeout_s``,
``retry_attempts``, ``poll_s``, ``lease_s``, ``settle_s``, ``auto_trigger``, ``max_attempts``.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest
from gateway.middlewares import requester_of
from gateway.services.inference import InferenceService

log = logging.getLogger(__name__)

def _svc(request: web.Request) -> InferenceService:
    return request.app[keys.INFERENCE]


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request):
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body: not JSON") from None


async def register_model(request: web.Request) -> web.Response:
    view, created = await _svc(request).register(requester_of(request), await _body(request))
    return _json(view, 201 if created else 200)


async def list_models(request: web.Request) -> web.Response:
    return _json({"models": await _svc(request).cards()})


async def submit_job(request: web.Request) -> web.Response:
    jobs, created = await _svc(request).submit(requester_of(request), await _body(request))
    return _json({"jobs": jobs}, 202 if created else 200)


async def list_jobs(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit: expected an integer") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit: 1..1000")
    return _json({"jobs": await _svc(request).jobs(requester_of(request), q.get("state"), q.get("study"), limit)})


async def get_job(request: web.Request) -> web.Response:
    return _json(await _svc(request).job(requester_of(request), request.match_info["job"]))


async def monitoring(request: web.Request) -> web.Response:
    """Model monitoring: drift by scanner (PSI + alerts), performance vs reference standard, energy."""
    q = request.query
    if not q.get("model"):
        raise BadRequest("model: required (a registered model card name)")
    since = None
    if "since" in q:
        try:
            since = float(q["since"])
        except ValueError:
            raise BadRequest("since: expected epoch seconds") from None
    by = q.get("by", "manufacturer")
    if by not in ("manufacturer", "scanner_model", "protocol"):
        raise BadRequest("by: manufacturer, scanner_model or protocol")
    return _json(await _svc(request).monitoring(requester_of(request), q["model"], q.get("version"), since, by))


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/inference/models", register_model, name="inference.register_model")
    r.add_get("/inference/models", list_models, name="inference.list_models")
    r.add_post("/inference/jobs", submit_job, name="inference.submit_job")
    r.add_get("/inference/jobs", list_jobs, name="inference.list_jobs")
    r.add_get("/inference/jobs/{job}", get_job, name="inference.get_job")
    r.add_get("/inference/monitoring", monitoring, name="inference.monitoring")


__all__ = ["setup_routes"]
