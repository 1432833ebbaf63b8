"""FHIR R4 REST handlers under ``/fhir`` (FHIR R4 §3.1.0 "RESTful API", wire format 4.0.1, JSON).

Each handler parses the HTTP request, calls one :class:`~gateway.services.fhir.FhirService` method and
renders the result; every error is an OperationOutcome with the matching status (see
:func:`render_operation_outcome`).
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import format_datetime
from urllib.parse import urlencode

import orjson
from aiohttp import web

from gateway import keys
from gateway.edge import public_base
from gateway.errors import (BadRequest, GatewayError, MethodNotAllowed, NotAcceptable, PayloadTooLarge,
                            UnsupportedMediaType)
from gateway.ids import new_id
from gateway.middlewares import requester_of
from gateway.services.fhir import FhirService
from gateway.store.fhir_repo import Stored
from mappings.dates import now_instant

FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "*/*", "application/*")
TYPE_RE = r"[A-Z][A-Za-z]+"
ID_RE = r"[A-Za-z0-9\-.]{1,64}"


_BAD_ID_PATH = re.compile(r"/fhir/" + TYPE_RE + r"/(?!_history$|_search$)([^/]+)(/_history(/[^/]*)?)?/?")


#: the FHIR operations this server implements (docs/fhir.md); any other ``$name`` answers 400 not-supported
SUPPORTED_OPERATIONS = ("Patient/[id]/$everything, $export, Patient/$export, Group/[id]/$export, CodeSystem/$lookup, "
                        "CodeSystem/$subsumes, ValueSet/$expand")


def render_operation_outcome(request: web.Request, exc: GatewayError) -> web.Response:
    if exc.status == 405 and (m := re.fullmatch(r"/fhir/(" + TYPE_RE + r")(/[^/]+)?/?", request.path)) \
            and m.group(1) in READ_ONLY_TYPES:  # not the generic routes' methods
        exc.headers["Allow"] = READ_ONLY_TYPES[m.group(1)]
    if exc.status in (404, 405) and request.match_info.route.resource is None:
        op = next((seg for seg in request.path.split("/") if seg.startswith("$")), None)
        m = _BAD_ID_PATH.fullmatch(request.path)
        if op is not None:  # an operation no route implements: say so, like the same entry in a Bundle
            shown = op if len(op) <= 40 else op[:40] + "..."
            exc = GatewayError(f"FHIR operation {shown!r} is not supported here (this server implements "
                               f"{SUPPORTED_OPERATIONS})", status=400, issue_code="not-supported")
        elif m and not re.fullmatch(ID_RE, m.group(1)):  # Type/<not an id>: the id is wrong, not the route
            shown = m.group(1) if len(m.group(1)) <= 80 else m.group(1)[:80] + "..."
            exc = BadRequest(f"{shown!r} ({len(m.group(1)):,} characters) is not a FHIR id "
                             "([A-Za-z0-9-.]{1,64})", expression=["id"])
    issue = {"severity": "error" if exc.status < 500 else "fatal", "code": exc.issue_code, "diagnostics": exc.message}
    if exc.expression:
        issue["expression"] = exc.expression
    issues = [issue]
    details = exc.details if isinstance(exc.details, list) else []
    for d in details[1:10]:
        if hasattr(d, "expression"):
            issues.append({"severity": "error", "code": exc.issue_code, "diagnostics": d.message, "expression": [d.expression]})
    body = {"resourceType": "OperationOutcome", "issue": issues}
    return web.Response(status=exc.status, body=orjson.dumps(body), content_type=FHIR_JSON, headers=exc.headers)


#: types served read-only from their own store (gateway/handlers/audit.py): the generic write routes
#: answer 405 with the Allow header the document gives them
READ_ONLY_TYPES = {"AuditEvent": "GET, HEAD"}


def read_only_type(request: web.Request) -> None:
    allow = READ_ONLY_TYPES.get(request.match_info.get("type", ""))
    if allow:
        raise MethodNotAllowed(f"{request.match_info['type']} is the server's audit trail and read-only",
                               headers={"Allow": allow})


def _svc(request: web.Request) -> FhirService:
    return request.app[keys.FHIR]


def base_url(request: web.Request) -> str:
    configured = request.app[keys.SETTINGS].base_url
    if configured:
        return configured.rstrip("/") + "/fhir"
    return public_base(request) + "/fhir"


def check_accept(request: web.Request) -> None:
    fmt = request.query.get("_format")
    if fmt and fmt not in ("json", "application/json", "application/fhir+json", "application/json+fhir"):
        raise NotAcceptable(f"_format {fmt!r} is not supported; this server speaks application/fhir+json")
    accept = request.headers.get("Accept")
    if not accept or fmt:
        return
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in JSON_TYPES or media.startswith("application/fhir+json"):
            return
    raise NotAcceptable(f"Accept {accept!r} is not supported; this server speaks application/fhir+json")


async def read_json_body(request: web.Request,
                         allowed: tuple[str, ...] = ("application/fhir+json", "application/json", "application/json+fhir"),
                         ) -> object:
    ctype = request.content_type
    if ctype not in allowed:
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not supported; send application/fhir+json")
    limit = request.app[keys.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes") from None
    if not raw:
        raise BadRequest("request body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def http_date(instant: str) -> str:
    """RFC 9110 HTTP-date for a FHIR instant (Last-Modified)."""
    return format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")), usegmt=True)


def resource_response(st: Stored, status: int = 200, *, location_base: str | None = None,
                      prefer: str | None = None) -> web.Response:
    headers = {"ETag": st.etag, "Last-Modified": http_date(st.last_updated)}
    if location_base:
        headers["Location"] = f"{location_base}/{st.res_type}/{st.res_id}/_history/{st.version}"
    if prefer == "minimal":
        return web.Response(status=status, headers=headers)
    if prefer == "OperationOutcome":
        body = {"resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational",
                           "diagnostics": f"{st.res_type}/{st.res_id} version {st.version} stored"}]}
        return web.Response(status=status, body=orjson.dumps(body), content_type=FHIR_JSON, headers=headers)
    return web.Response(status=status, body=st.content.encode(), content_type=FHIR_JSON, headers=headers)


def _prefer_return(request: web.Request) -> str | None:
    for part in request.headers.get("Prefer", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == "return":
            return v.strip('"')
    return None


def _lenient(request: web.Request) -> bool:
    return "handling=lenient" in request.headers.get("Prefer", "").replace(" ", "")


def bundle_bytes(kind: str, entries: list[bytes], *, total: int | None, links: list[tuple[str, str]]) -> bytes:
    """A Bundle assembled from already-serialised entries (no re-parse of stored JSON)."""
    ts, _ = now_instant()
    head = {"resourceType": "Bundle", "id": new_id(), "meta": {"lastUpdated": ts}, "type": kind}
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": r, "url": u} for r, u in links]
    if not entries:  # FHIR JSON: no empty arrays
        return orjson.dumps(head)
    prefix = orjson.dumps(head)[:-1]
    return prefix + b',"entry":[' + b",".join(entries) + b"]}"


def _entry(base: str, st: Stored, mode: str | None) -> bytes:
    search = b',"search":{"mode":"' + mode.encode() + b'"}' if mode else b""
    return (b'{"fullUrl":"' + f"{base}/{st.res_type}/{st.res_id}".encode() + b'","resource":'
            + st.content.encode() + search + b"}")


# -- handlers -----------------------------------------------------------------------------------


async def metadata(request: web.Request) -> web.Response:
    """CapabilityStatement (FHIR R4 §3.1.0.13 "capabilities")."""
    check_accept(request)
    from gateway.services.capability import capability_statement

    body = capability_statement(request.app[keys.SETTINGS], base_url(request))
    return web.Response(body=orjson.dumps(body), content_type=FHIR_JSON)


#: the data scopes fedgate maps onto roles (gateway.auth.smart_grant; per-type forms such as
#: ``patient/Observation.read`` too); ``patient/`` scopes read only, with the launch patient's context
SMART_SCOPES = ["openid", "fhirUser", "launch/patient", "patient/*.read", "patient/*.rs",
                "user/*.read", "user/*.write", "user/*.*", "user/*.rs", "user/*.cruds",
                "system/*.read", "system/*.write", "system/*.*", "system/*.rs", "system/*.cruds"]


def smart_configuration_doc(settings, token_endpoint: str | None = None) -> dict:
    """SMART App Launch 2.0 discovery (``.well-known/smart-configuration``) from the settings; ``token_endpoint``:
    fedgate's own SMART Backend Services endpoint (``/auth/token``), advertised when backend clients are set."""
    doc: dict = {
        "scopes_supported": SMART_SCOPES,
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "capabilities": ["permission-patient", "permission-user", "permission-v1", "permission-v2",
                         "client-confidential-symmetric",
                         "client-confidential-asymmetric"],
    }
    if settings.jwt_issuer.startswith(("http://", "https://")):
        doc["issuer"] = settings.jwt_issuer
    if settings.jwks.startswith(("http://", "https://")):
        doc["jwks_uri"] = settings.jwks
    if settings.smart_authorize_url and settings.smart_token_url:
        doc["authorization_endpoint"] = settings.smart_authorize_url
        doc["token_endpoint"] = settings.smart_token_url
        doc["capabilities"] += ["launch-standalone", "client-public", "sso-openid-connect"]
    elif token_endpoint and settings.extra.get("backend_clients"):
        doc["token_endpoint"] = token_endpoint  # SMART Backend Services (client_credentials + private_key_jwt)
    if settings.extra.get("backend_clients"):
        doc["token_endpoint_auth_signing_alg_values_supported"] = ["RS384", "ES384"]
    return doc


async def smart_configuration(request: web.Request) -> web.Response:
    """SMART App Launch discovery (http://hl7.org/fhir/smart-app-launch/conformance.html), public."""
    from gateway.handlers.smart_auth import token_url

    return web.json_response(smart_configuration_doc(request.app[keys.SETTINGS], token_url(request)))


async def read(request: web.Request) -> web.Response:
    """read: GET [base]/[type]/[id] (FHIR R4 §3.1.0.2)."""
    check_accept(request)
    st = await _svc(request).read(requester_of(request), request.match_info["type"], request.match_info["id"])
    inm = request.headers.get("If-None-Match")
    if inm and inm.strip() == st.etag:
        return web.Response(status=304, headers={"ETag": st.etag})
    return resource_response(st)


async def vread(request: web.Request) -> web.Response:
    """vread: GET [base]/[type]/[id]/_history/[vid] (FHIR R4 §3.1.0.3)."""
    check_accept(request)
    m = request.match_info
    return resource_response(await _svc(request).vread(requester_of(request), m["type"], m["id"], m["vid"]))


async def create(request: web.Request) -> web.Response:
    """create: POST [base]/[type], conditional with If-None-Exist (FHIR R4 §3.1.0.8)."""
    read_only_type(request)
    check_accept(request)
    body = await read_json_body(request)
    out = await _svc(request).create(requester_of(request), request.match_info["type"], body,
                                     request.headers.get("If-None-Exist"))
    return resource_response(out.stored, 201 if out.created else 200, location_base=base_url(request),
                             prefer=_prefer_return(request))


async def update(request: web.Request) -> web.Response:
    """update: PUT [base]/[type]/[id] with If-Match (FHIR R4 §3.1.0.4, §3.1.0.5 version-aware)."""
    read_only_type(request)
    check_accept(request)
    body = await read_json_body(request)
    m = request.match_info
    out = await _svc(request).update(requester_of(request), m["type"], m["id"], body, request.headers.get("If-Match"))
    return resource_response(out.stored, 201 if out.created else 200, location_base=base_url(request),
                             prefer=_prefer_return(request))


async def delete(request: web.Request) -> web.Response:
    """delete: DELETE [base]/[type]/[id] (FHIR R4 §3.1.0.7); idempotent."""
    read_only_type(request)
    m = request.match_info
    st = await _svc(request).delete(requester_of(request), m["type"], m["id"])
    headers = {"ETag": st.etag} if st else {}
    return web.Response(status=204, headers=headers)


async def _search(request: web.Request, pairs: list[tuple[str, str]], compartment: str | None = None) -> web.Response:
    svc = _svc(request)
    res_type = request.match_info["type"]
    svc.check_type(res_type)
    q = svc.parse_search(res_type, pairs, lenient=_lenient(request))
    if compartment is None:
        result = await svc.search(requester_of(request), q)
        path = res_type
    else:
        result = await svc.compartment_search(requester_of(request), compartment, q)
        path = f"Patient/{compartment}/{res_type}"
    base = base_url(request)
    plain = [(k, v) for k, v in pairs if k not in ("_offset", "_cursor") and k not in q.ignored]
    start = q.position if q.after is not None else q.offset
    return _searchset(base, path, plain, start, q.count, q.summary, result, cursor=q.cursor)


def _searchset(base: str, path: str, plain: list[tuple[str, str]], offset: int, count: int | None,
               summary: str | None, result, cursor: str | None = None) -> web.Response:
    """A searchset Bundle of one page, with self/next/previous links on ``base/path``: ``next`` carries the
    keyset cursor the service issued (``_cursor``), else (system search) the next ``_offset``;
    ``previous`` is by ``_offset`` (``offset``: the rows before this page)."""
    where = f"{base}/{path}" if path else base

    def link(extra: list[tuple[str, str]]) -> str:
        return f"{where}?" + urlencode(plain + extra)

    here = [("_cursor", cursor)] if cursor else ([("_offset", str(offset))] if offset else [])
    links = [("self", link(here))]
    if summary != "count" and count:
        if result.next_cursor:
            links.append(("next", link([("_cursor", result.next_cursor)])))
        elif result.more if result.more is not None else (result.total is not None and offset + count < result.total):
            links.append(("next", link([("_offset", str(offset + count))])))
        if offset > 0:
            links.append(("previous", link([("_offset", str(max(0, offset - count)))])))
    entries = [_entry(base, st, "match") for st in result.matches]
    entries += [_entry(base, st, "include") for st in result.included]
    body = bundle_bytes("searchset", entries, total=result.total, links=links)
    return web.Response(body=body, content_type=FHIR_JSON)


async def search_get(request: web.Request) -> web.Response:
    """search: GET [base]/[type]?params (FHIR R4 §3.1.0.9; search rules in §3.1.1)."""
    check_accept(request)
    return await _search(request, list(request.query.items()))


async def search_post(request: web.Request) -> web.Response:
    """search: POST [base]/[type]/_search with form-encoded parameters (FHIR R4 §3.1.0.9)."""
    check_accept(request)
    if request.content_type not in ("application/x-www-form-urlencoded", "") and request.can_read_body:
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters")
    form = await request.post() if request.can_read_body else {}
    pairs = list(request.query.items()) + [(k, str(v)) for k, v in form.items()]
    return await _search(request, pairs)


async def compartment_search(request: web.Request) -> web.Response:
    """compartment search: GET [base]/Patient/[id]/[type]?params (FHIR R4 §3.1.1.1.5)."""
    check_accept(request)
    return await _search(request, list(request.query.items()), compartment=request.match_info["id"])


async def system_search(request: web.Request) -> web.Response:
    """search-system: GET [base]?_type=A,B&params (FHIR R4 §3.1.0.9)."""
    check_accept(request)
    pairs = list(request.query.items())
    types = [t.strip() for k, v in pairs if k == "_type" for t in v.split(",") if t.strip()]
    rest = [(k, v) for k, v in pairs if k != "_type"]
    result, count, offset = await _svc(request).system_search(requester_of(request), types, rest, _lenient(request))
    plain = [("_type", ",".join(types))] + [(k, v) for k, v in rest if k != "_offset"]
    return _searchset(base_url(request), "", plain, offset, count, None, result)


async def everything(request: web.Request) -> web.Response:
    """Patient/[id]/$everything (FHIR R4 OperationDefinition Patient-everything): a searchset Bundle."""
    check_accept(request)
    types = [t.strip() for v in request.query.getall("_type", []) for t in v.split(",") if t.strip()] or None
    for k in request.query:
        if k not in ("_type", "_format", "_pretty"):
            raise BadRequest(f"$everything parameter {k!r} is not supported (use _type)", expression=[k])
    rows = await _svc(request).everything(requester_of(request), request.match_info["id"], types)
    base = base_url(request)
    body = bundle_bytes("searchset", [_entry(base, st, "match") for st in rows], total=len(rows),
                        links=[("self", f"{base}/Patient/{request.match_info['id']}/$everything")])
    return web.Response(body=body, content_type=FHIR_JSON)


async def patch(request: web.Request) -> web.Response:
    """patch: PATCH [base]/[type]/[id] with a JSON Patch document (FHIR R4 §3.1.0.6), If-Match honoured."""
    check_accept(request)
    if request.content_type not in ("application/json-patch+json", "application/json"):
        raise UnsupportedMediaType(f"Content-Type {request.content_type!r} is not supported; PATCH takes "
                                   "application/json-patch+json (JSON Patch, RFC 6902)")
    ops = await read_json_body(request, allowed=("application/json-patch+json", "application/json"))
    m = request.match_info
    out = await _svc(request).patch(requester_of(request), m["type"], m["id"], ops, request.headers.get("If-Match"))
    return resource_response(out.stored, 200, location_base=base_url(request), prefer=_prefer_return(request))


async def _history(request: web.Request, res_type: str | None, res_id: str | None) -> web.Response:
    rows, total, count, offset = await _svc(request).history(requester_of(request), res_type, res_id,
                                                              list(request.query.items()))
    base = base_url(request)
    entries = []
    for st in rows:
        method = "DELETE" if st.deleted else ("POST" if st.version == 1 else "PUT")
        url = f"{st.res_type}/{st.res_id}" if method != "POST" else st.res_type
        resp = {"status": "204" if st.deleted else ("201" if st.version == 1 else "200"), "etag": st.etag,
                "lastModified": st.last_updated}
        piece = {"fullUrl": f"{base}/{st.res_type}/{st.res_id}", "request": {"method": method, "url": url},
                 "response": resp}
        raw = orjson.dumps(piece)
        if st.content:
            raw = raw[:-1] + b',"resource":' + st.content.encode() + b"}"
        entries.append(raw)
    path = "/".join(p for p in (res_type, res_id) if p)
    self_url = f"{base}/{path}/_history" if path else f"{base}/_history"
    links = [("self", self_url)]
    if offset + count < total:
        links.append(("next", f"{self_url}?" + urlencode({"_count": count, "_offset": offset + count})))
    if offset:
        links.append(("previous", f"{self_url}?" + urlencode({"_count": count, "_offset": max(0, offset - count)})))
    return web.Response(body=bundle_bytes("history", entries, total=total, links=links), content_type=FHIR_JSON)


async def history_instance(request: web.Request) -> web.Response:
    """history: GET [base]/[type]/[id]/_history (FHIR R4 §3.1.0.10)."""
    check_accept(request)
    return await _history(request, request.match_info["type"], request.match_info["id"])


async def history_type(request: web.Request) -> web.Response:
    """history: GET [base]/[type]/_history (FHIR R4 §3.1.0.10)."""
    check_accept(request)
    return await _history(request, request.match_info["type"], None)


async def history_system(request: web.Request) -> web.Response:
    """history: GET [base]/_history (FHIR R4 §3.1.0.10)."""
    check_accept(request)
    return await _history(request, None, None)


async def bundle(request: web.Request) -> web.Response:
    """batch/transaction: POST [base] with a Bundle (FHIR R4 §3.1.0.11)."""
    check_accept(request)
    body = await read_json_body(request)
    out = await _svc(request).bundle(requester_of(request), body)
    return web.Response(body=orjson.dumps(out), content_type=FHIR_JSON)


def setup_routes(app: web.Application) -> None:
    r = app.router
    t, i = "{type:" + TYPE_RE + "}", "{id:" + ID_RE + "}"
    r.add_get("/fhir/metadata", metadata, name="fhir.metadata")
    r.add_post("/fhir", bundle, name="fhir.bundle")
    r.add_post("/fhir/", bundle, name="fhir.bundle_slash")
    r.add_get("/fhir/_history", history_system, name="fhir.history_system")
    r.add_get(f"/fhir/{t}/_history", history_type, name="fhir.history_type")
    r.add_post(f"/fhir/{t}/_search", search_post, name="fhir.search_post")
    r.add_get(f"/fhir/{t}", search_get, name="fhir.search")
    r.add_post(f"/fhir/{t}", create, name="fhir.create")
    r.add_get(f"/fhir/{t}/{i}", read, name="fhir.read")
    r.add_put(f"/fhir/{t}/{i}", update, name="fhir.update")
    r.add_delete(f"/fhir/{t}/{i}", delete, name="fhir.delete")
    r.add_patch(f"/fhir/{t}/{i}", patch, name="fhir.patch")
    r.add_get("/fhir", system_search, name="fhir.search_system")
    r.add_get("/fhir/", system_search, name="fhir.search_system_slash")
    r.add_get(f"/fhir/Patient/{i}/$everything", everything, name="fhir.everything")
    r.add_get(f"/fhir/Patient/{i}/{t}", compartment_search, name="fhir.search_compartment")
    r.add_get(f"/fhir/{t}/{i}/_history", history_instance, name="fhir.history_instance")
    r.add_get(f"/fhir/{t}/{i}/_history/{{vid}}", vread, name="fhir.vread")
    app[keys.ERROR_RENDERERS]["/fhir"] = render_operation_outcome
    r.add_get("/fhir/.well-known/smart-configuration", smart_configuration, name="fhir.smart_configuration")
    r.add_get("/.well-known/smart-configuration", smart_configuration, name="smart_configuration")
    app[keys.PUBLIC_ROUTES].update({"fhir.metadata", "fhir.smart_configuration", "smart_configuration"})
