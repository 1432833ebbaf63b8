"""FHIR terminology operations over the vocabulary store (docs/fhir.md, "Terminology"):

* ``GET|POST /fhir/CodeSystem/$lookup?system=&code=`` — display, release, parents and children;
* ``GET|POST /fhir/CodeSystem/$subsumes?system=&codeA=&codeB=`` — equivalent / subsumes / subsumed-by /
  not-subsumed;
* ``GET|POST /fhir/ValueSet/$expand?url=`` — an implicit value set of a loaded system: ``SYSTEM`` (all
  codes) or ``SYSTEM?fhir_vs=isa/CODE`` (the code and its descendants), paged with ``offset``/``count``,
  ``filter`` on the display.

Codes are not patient data: any authenticated caller may use them, no consent scope applies.  Input as
query parameters (GET) or a FHIR ``Parameters`` body (POST); errors are OperationOutcomes.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, NotFound
from gateway.handlers.fhir import FHIR_JSON, check_accept, read_json_body
from gateway.services.vocab import VocabService

MAX_COUNT = 10_000


def _svc(request: web.Request) -> VocabService:
    return request.app[keys.VOCAB]


async def _params(request: web.Request) -> dict[str, str]:
    check_accept(request)
    if request.method == "GET":
        return {k: v for k, v in request.query.items() if not k.startswith("_")}
    body = await read_json_body(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("the body must be a FHIR Parameters resource", expression=["Parameters"])
    out: dict[str, str] = {}
    for i, p in enumerate(body.get("parameter") or ()):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise BadRequest(f"Parameters.parameter[{i}].name is required", expression=[f"Parameters.parameter[{i}]"])
        for key in ("valueUri", "valueCode", "valueString", "valueCanonical", "valueInteger"):
            if key in p:
                out[p["name"]] = str(p[key])
                break
        else:
            if isinstance(p.get("valueCoding"), dict):  # $lookup coding / $subsumes codingA, codingB
                c = p["valueCoding"]
                suffix = p["name"][len("coding"):]
                if c.get("system"):
                    out["system"] = str(c["system"])
                if c.get("code") is not None:
                    out["code" + suffix] = str(c["code"])
    return out


def _need(params: dict[str, str], *names: str) -> list[str]:
    missing = [n for n in names if not params.get(n)]
    if missing:
        raise BadRequest(f"parameter(s) {', '.join(missing)} required", expression=missing)
    return [params[n] for n in names]


def _reply(body: dict) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type=FHIR_JSON)


async def lookup(request: web.Request) -> web.Response:
    params = await _params(request)
    system, code = _need(params, "system", "code")
    found = await _svc(request).lookup(system, code)
    if found is None:
        raise NotFound(f"code {code!r} is not in a loaded version of {system!r}", issue_code="not-found",
                       expression=["code"])
    out = [{"name": "name", "valueString": found["name"]}]
    if found.get("release"):
        out.append({"name": "version", "valueString": found["release"]})
    if found.get("display"):
        out.append({"name": "display", "valueString": found["display"]})
    for rel, key in (("parent", "parents"), ("child", "children")):
        for c in found[key]:
            out.append({"name": "property", "part": [{"name": "code", "valueCode": rel}, {"name": "value", "valueCode": c}]})
    if found.get("concept_id") is not None:
        out.append({"name": "property", "part": [{"name": "code", "valueCode": "omop-concept-id"},
                                                  {"name": "value", "valueString": str(found["concept_id"])}]})
    return _reply({"resourceType": "Parameters", "parameter": out})


async def subsumes(request: web.Request) -> web.Response:
    params = await _params(request)
    system, a, b = _need(params, "system", "codeA", "codeB")
    outcome = await _svc(request).subsumes(system, a, b)
    if outcome is None:
        raise NotFound(f"codeA or codeB is not in a loaded version of {system!r}", issue_code="not-found",
                       expression=["codeA", "codeB"])
    return _reply({"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": outcome}]})


def _int(params: dict[str, str], name: str, default: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > hi:
        raise BadRequest(f"{name} must be an integer 0..{hi}", expression=[name])
    return int(raw)


async def expand(request: web.Request) -> web.Response:
    params = await _params(request)
    (url,) = _need(params, "url")
    system, _, query = url.partition("?")
    is_a = None
    if query:
        key, _, value = query.partition("=")
        if key != "fhir_vs" or not value.startswith("isa/") or len(value) <= 4:
            raise BadRequest("url: only SYSTEM or SYSTEM?fhir_vs=isa/CODE (implicit value sets) are supported",
                             expression=["url"])
        is_a = value[4:]
    offset = _int(params, "offset", 0, 2**31 - 1)
    count = _int(params, "count", 1000, MAX_COUNT)
    result = await _svc(request).expand(system, is_a=is_a, offset=offset, count=count, text=params.get("filter"))
    if result is None:
        raise NotFound(f"code system {system!r} is not loaded", issue_code="not-found", expression=["url"])
    total, rows = result
    contains = [{"system": r["system"], "code": r["code"], **({"display": r["display"]} if r["display"] else {})}
                for r in rows]
    from mappings.dates import now_instant

    return _reply({"resourceType": "ValueSet", "url": url, "status": "active",
                   "expansion": {"timestamp": now_instant()[0], "total": total, "offset": offset,
                                 **({"contains": contains} if contains else {})}})


def setup_routes(app: web.Application) -> None:
    """Before the generic ``/fhir/{type}/{id}`` routes (``$`` is not an id character anyway)."""
    r = app.router
    for path, fn, name in (("/fhir/CodeSystem/$lookup", lookup, "fhir.codesystem_lookup"),
                           ("/fhir/CodeSystem/$subsumes", subsumes, "fhir.codesystem_subsumes"),
                           ("/fhir/ValueSet/$expand", expand, "fhir.valueset_expand")):
        r.add_get(path, fn, name=name)
        r.add_post(path, fn, name=name + "_post")


__all__ = ["setup_routes"]
