"""Federation routes (docs/federation.md).

Site: ``POST /federation/cohort/count`` and ``POST /federation/stats`` authenticate *themselves*: they
accept a hub → site token (ES256, signed by a hub this site trusts, audience = this site) or an
analyst's own gateway token, so the auth middleware lets them through (public at that level) and the
handler refuses anything else with 401/403.  Hub: ``POST /federation/query`` (normal bearer token) fans
out to the configured sites; ``GET /federation/sites`` lists them.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway import keys
from gateway.auth import PURPOSE_HEADER
from gateway.context import Requester
from gateway.errors import BadRequest, NotFound, Unauthorized
from gateway.middlewares import requester_of
from gateway.services.access import AccessRecord
from gateway.services.federation import (
    BREAKDOWNS,
    CohortRequest,
)

# the keys these routes use, by their short names (gateway/app.py builds the services)
SITE, HUB, HUB_TOKENS, CONFIG = keys.FEDERATION_SITE, keys.FEDERATION_HUB, keys.HUB_TOKENS, keys.FEDERATION_CONFIG


async def _json(request: web.Request) -> tuple[bytes, object]:
    body = await request.read()
    try:
        return body, orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body: not JSON", expression=["$"]) from None


async def _authenticate(request: web.Request, body: bytes):
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token", headers={"WWW-Authenticate": 'Bearer realm="fedgate"'})
    token = header[7:].strip()
    hub_tokens = request.app[HUB_TOKENS]
    try:
        if hub_tokens.is_hub_token(token):
            requester, hub = hub_tokens.verify(token, body)
            await hub_tokens.remember(request.app[keys.DB], requester.token_id)
            return requester, f"hub:{hub}"
        return request.app[keys.VERIFIER].verify(token, request.headers.get(PURPOSE_HEADER)), "direct"
    except Unauthorized as exc:
        exc.headers.setdefault("WWW-Authenticate", 'Bearer realm="fedgate", error="invalid_token"')
        await request.app[keys.AUDIT].record(AccessRecord(
            requester=_ANON, action="E", interaction="federation-cohort", outcome="4", path=request.path,
            detail=f"refused: {exc.message}"))
        raise


async def site_answer(request: web.Request, *, stats_only: bool) -> web.Response:
    body, doc = await _json(request)
    requester, via = await _authenticate(request, body)
    req = CohortRequest.from_json(doc, default_breakdowns=() if stats_only else BREAKDOWNS)
    if stats_only and not req.stats:
        raise BadRequest("stats: name at least one numeric field", expression=["$.stats"])
    app = request.app
    result = await app[SITE].answer(requester, req, gate=app[keys.GATE], audit=app[keys.AUDIT], via=via,
                                    path=request.path)
    return web.Response(body=orjson.dumps(result), content_type="application/json")


async def cohort_count(request: web.Request) -> web.Response:
    return await site_answer(request, stats_only=False)


async def stats(request: web.Request) -> web.Response:
    return await site_answer(request, stats_only=True)


async def query(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if hub is None:
        raise NotFound("this gateway is not configured as a federation hub (federation.role)")
    _, doc = await _json(request)
    if not isinstance(doc, dict):
        raise BadRequest("request body: a JSON object with 'cohort'", expression=["$"])
    result = await hub.query(requester_of(request), doc)
    return web.Response(body=orjson.dumps(result), content_type="application/json")


async def sites(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    return web.json_response({"role": cfg.role, "hub_id": cfg.hub_id if cfg.is_hub else None,
                              "sites": [{"id": s.id, "url": s.url} for s in cfg.sites] if cfg.is_hub else []})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/federation/cohort/count", cohort_count, name="federation.count")
    app.router.add_post("/federation/stats", stats, name="federation.stats")
    app.router.add_post("/federation/query", query, name="federation.query")
    app.router.add_get("/federation/sites", sites, name="federation.sites")
    # The site routes authenticate in the handler (hub token or analyst token), not in the middleware.
    app[keys.PUBLIC_ROUTES].update({"federation.count", "federation.stats"})


_ANON = Requester("anonymous")

__all__ = ["setup_routes", "SITE", "HUB", "CONFIG"]
