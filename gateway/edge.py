"""The gateway's browser and deployment edge: CORS and forwarded headers from trusted reverse proxies.

* **CORS** (``cors_origins``): a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
  on any route answers 204 with the route's methods and the request headers fedgate reads, for an allowed
  origin only; any other origin (or none configured) gets 403 without CORS headers: fail closed. Every
  response to an allowed origin (errors included: 401, 403, 404, 500, ...) carries
  ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers``.
* **Forwarded headers** (``trusted_proxies``): when the TCP peer is a trusted proxy, RFC 7239 ``Forwarded``
  (``host``, ``proto``) or ``X-Forwarded-Host``/``-Proto`` and ``X-Forwarded-Prefix`` decide the public base
  of every URL the gateway writes (see :func:`public_base`); from any other peer they are ignored.
  A configured ``base_url`` wins over both.
"""

from __future__ import annotations

import ipaddress
import re

import orjson
from aiohttp import web

from gateway import keys

#: Headers a browser may send cross-origin (those fedgate reads).
ALLOW_HEADERS = ("Authorization, Content-Type, Accept, X-Purpose-Of-Use, If-Match, If-None-Match, "
                 "If-None-Exist, If-Modified-Since, Prefer, X-Request-Id")
#: Response headers a cross-origin script may read.
EXPOSE_HEADERS = "X-Total-Count, Warning, Location, ETag, Content-Location"
MAX_AGE_S = "600"

#: The public path prefix a trusted proxy announced (``X-Forwarded-Prefix``), "" when none.
PREFIX: web.RequestKey[str] = web.RequestKey("public_prefix", str)
#: True when a trusted proxy set the public host (the gateway's own port is then not the public one).
FORWARDED: web.RequestKey[bool] = web.RequestKey("forwarded_host", bool)

_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$")
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+/?$")


def public_base(request: web.Request) -> str:
    """``scheme://host[/prefix]`` as the client sees this gateway (``base_url`` is the caller's business)."""
    return f"{request.scheme}://{request.host}{request.get(PREFIX, '')}"


# -------------------------------------------------------------------------------------------- CORS


def _origin_allowed(settings, origin: str | None) -> bool:
    if not origin:
        return False
    allowed = settings.cors_origin_list
    return "*" in allowed or origin.rstrip("/") in allowed


@web.middleware
async def cors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Answer CORS preflights (before authentication: browsers send them without credentials)."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return await handler(request)
    origin = request.headers.get("Origin")
    settings = request.app[keys.SETTINGS]
    exc = request.match_info.http_exception
    if isinstance(exc, web.HTTPNotFound) or (exc is not None and not isinstance(exc, web.HTTPMethodNotAllowed)):
        return await handler(request)  # no such route: the ordinary 404
    if not _origin_allowed(settings, origin):
        body = {"type": "about:blank", "title": "Forbidden", "status": 403,
                "detail": "cross-origin request from an origin not in cors_origins"}
        return web.Response(status=403, body=orjson.dumps(body), content_type="application/problem+json")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        methods = set(exc.allowed_methods)
    else:
        methods = {request.match_info.route.method}
    methods.discard("*")
    methods.add("OPTIONS")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": ", ".join(sorted(methods)),
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": MAX_AGE_S,
    })


async def cors_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers on every response (streamed and error ones too) to an allowed origin."""
    settings = request.app[keys.SETTINGS]
    if not settings.cors_origins:
        return
    origin = request.headers.get("Origin")
    vary = response.headers.get("Vary")
    if not vary:
        response.headers["Vary"] = "Origin"
    elif "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin"
    if not _origin_allowed(settings, origin):
        return
    response.headers["Access-Control-Allow-Origin"] = origin.rstrip("/")
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


# ---------------------------------------------------------------------------------- forwarded headers


_NETS: dict[str, tuple] = {}


def _networks(settings) -> tuple:
    nets = _NETS.get(settings.trusted_proxies)
    if nets is None:
        nets = _NETS[settings.trusted_proxies] = tuple(
            ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxy_list)
    return nets


def _trusted(nets: tuple, addr: str | None) -> bool:
    if not addr:
        return False
    addr = addr.strip().strip('"')
    if addr.startswith("["):  # RFC 7239 quoted IPv6 "[::1]:port"
        addr = addr[1:].split("]", 1)[0]
    elif addr.count(":") == 1:  # IPv4 with a port
        addr = addr.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in nets)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def _pick(values: list[str], hops: int) -> str | None:
    """The value set by the outermost trusted proxy: ``hops`` trusted proxies back from the right."""
    if not values:
        return None
    return values[max(0, len(values) - 1 - hops)] or None


@web.middleware
async def forwarded_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Believe a trusted proxy's Forwarded / X-Forwarded-* headers: the request's scheme and host become the
    public ones (so ``request.url`` and every written URL use them) and the prefix is kept for
    :func:`public_base`."""
    settings = request.app[keys.SETTINGS]
    if not settings.trusted_proxies:
        return await handler(request)
    nets = _networks(settings)
    if not _trusted(nets, request.remote):
        return await handler(request)
    host = proto = None
    hops = 0
    forwarded = request.forwarded  # RFC 7239, parsed by aiohttp (one mapping per element)
    if forwarded:
        i = len(forwarded) - 1
        while i > 0 and _trusted(nets, forwarded[i].get("for")):
            i -= 1
        host, proto = forwarded[i].get("host"), forwarded[i].get("proto")
        hops = len(forwarded) - 1 - i
    else:
        xff = _split(request.headers.get("X-Forwarded-For"))
        while hops < len(xff) - 1 and _trusted(nets, xff[len(xff) - 1 - hops]):
            hops += 1
        host = _pick(_split(request.headers.get("X-Forwarded-Host")), hops)
        proto = _pick(_split(request.headers.get("X-Forwarded-Proto")), hops)
    prefix = _pick(_split(request.headers.get("X-Forwarded-Prefix")), hops)
    changes: dict[str, str] = {}
    if host and _HOST_RE.match(host):
        changes["host"] = host
    if proto and proto.lower() in ("http", "https"):
        changes["scheme"] = proto.lower()
    if changes:
        request = request.clone(**changes)
        if "host" in changes:
            request[FORWARDED] = True
    if prefix and _PREFIX_RE.match(prefix) and not prefix.startswith("//"):
        request[PREFIX] = prefix.rstrip("/")
    return await handler(request)


__all__ = ["cors_middleware", "cors_on_prepare", "forwarded_middleware", "public_base", "PREFIX", "FORWARDED"]
