"""``GET /fhir/AuditEvent`` (search) and ``GET /fhir/AuditEvent/{id}`` served from the audit store.

Admins only; other roles get 403 OperationOutcome ("searchable over FHIR by admins only").
Registered before the generic FHIR routes so these paths resolve here.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import Forbidden, NotFound
from gateway.handlers.fhir import base_url as fhir_base_url
from gateway.middlewares import requester_of
from gateway.services import audit as audit_service
from gateway.services.access import AccessRecord
from gateway.services.audit_codes import Action, Interaction, Outcome

FHIR_JSON = "application/fhir+json"


def _admin(request: web.Request):
    who = requester_of(request)
    if not who.is_admin:
        raise Forbidden("AuditEvent is readable by the admin role only")
    return who


async def _flush(request: web.Request) -> None:
    sink = request.app[keys.AUDIT]
    if isinstance(sink, audit_service.ChainedAudit):
        await sink.flush()


async def search(request: web.Request) -> web.Response:
    who = _admin(request)
    await _flush(request)
    events, total = await audit_service.search(request.app[keys.DB], list(request.query.items()))
    base = fhir_base_url(request)
    bundle = {
        "resourceType": "Bundle", "type": "searchset", "total": total,
        "link": [{"relation": "self", "url": f"{base}/AuditEvent" + (f"?{request.query_string}" if request.query_string else "")}],
    }
    if events:
        bundle["entry"] = [{"fullUrl": f"{base}/AuditEvent/{e['id']}", "resource": e, "search": {"mode": "match"}}
                           for e in events]
    await request.app[keys.AUDIT].record(AccessRecord(who, Action.EXECUTE, Interaction.SEARCH_TYPE, Outcome.SUCCESS,
                                                      detail="AuditEvent search",
                                                      path="/fhir/AuditEvent"))
    return web.Response(body=orjson.dumps(bundle), content_type=FHIR_JSON)


async def read(request: web.Request) -> web.Response:
    who = _admin(request)
    await _flush(request)
    seq = request.match_info["id"]
    if not seq.isdigit() or len(seq) > 18:  # beyond 64 bits: never a row (not an overflow in the database)
        raise NotFound(f"AuditEvent/{seq} not found")
    from sqlalchemy import select

    from gateway.store.audit_schema import audit_event

    async with request.app[keys.DB].read() as conn:
        content = (await conn.execute(select(audit_event.c.content).where(audit_event.c.seq == int(seq)))).scalar()
    if content is None:
        raise NotFound(f"AuditEvent/{seq} not found")
    event = orjson.loads(content)
    event["id"] = seq
    await request.app[keys.AUDIT].record(AccessRecord(who, Action.READ, Interaction.READ, Outcome.SUCCESS,
                                                      (f"AuditEvent/{seq}",),
                                                      path="/fhir/AuditEvent/{id}"))
    return web.Response(body=orjson.dumps(event), content_type=FHIR_JSON)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/fhir/AuditEvent", search, name="fhir.audit_search")
    app.router.add_get(r"/fhir/AuditEvent/{id:[A-Za-z0-9\-.]{1,64}}", read, name="fhir.audit_read")
