"""``GET /fhir/AuditEvent`` (search) and ``GET /fhir/AuditEvent/{id}`` served from the audit store.

Admins only; other roles get 403 OperationOutcome ("searchable over FHIR by admins only").
Registered before the generic FHIR routes so these paths resolve here.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway import keys
from gateway.handlers.fhir import base_url as fhir_base_url
from gateway.middlewares import requester_of
from gateway.services import audit as audit_service

FHIR_JSON = "application/fhir+json"


async def search(request: web.Request) -> web.Response:
    events, total = await audit_service.admin_search(request.app[keys.DB], request.app[keys.AUDIT],
                                                     requester_of(request), list(request.query.items()),
                                                     path="/fhir/AuditEvent")
    base = fhir_base_url(request)
    bundle = {
        "resourceType": "Bundle", "type": "searchset", "total": total,
        "link": [{"relation": "self", "url": f"{base}/AuditEvent" + (f"?{request.query_string}" if request.query_string else "")}],
    }
    if events:
        bundle["entry"] = [{"fullUrl": f"{base}/AuditEvent/{e['id']}", "resource": e, "search": {"mode": "match"}}
                           for e in events]
    return web.Response(body=orjson.dumps(bundle), content_type=FHIR_JSON)


async def read(request: web.Request) -> web.Response:
    event = await audit_service.admin_read(request.app[keys.DB], request.app[keys.AUDIT], requester_of(request),
                                           request.match_info["id"])
    return web.Response(body=orjson.dumps(event), content_type=FHIR_JSON)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/fhir/AuditEvent", search, name="fhir.audit_search")
    app.router.add_get(r"/fhir/AuditEvent/{id:[A-Za-z0-9\-.]{1,64}}", read, name="fhir.audit_read")
