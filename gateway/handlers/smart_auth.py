"""SMART Backend Services token endpoint ``POST /auth/token`` (docs/bulk-export.md "Authorisation").

The route authenticates the client itself (its signed assertion), so it is not behind the bearer-token
middleware; errors are RFC 6749 §5.2 JSON (``error``, ``error_description``), never a token or assertion.
"""

from __future__ import annotations


import orjson
from aiohttp import web

from gateway import keys
from gateway.edge import public_base
from gateway.errors import GatewayError
from gateway.services.backend_auth import OAuthError

TOKEN_PATH = "/auth/token"


def token_url(request: web.Request) -> str:
    """The token endpoint's URL as clients address it (the assertion's ``aud``)."""
    configured = request.app[keys.SETTINGS].base_url
    return (configured.rstrip("/") if configured else public_base(request)) + TOKEN_PATH


def render_oauth_error(request: web.Request, exc: GatewayError) -> web.Response:
    code = exc.oauth_code if isinstance(exc, OAuthError) else ("invalid_request" if exc.status < 500 else "server_error")
    headers = dict(exc.headers)
    headers["Cache-Control"] = "no-store"
    return web.Response(status=exc.status, body=orjson.dumps({"error": code, "error_description": exc.message}),
                        content_type="application/json", headers=headers)


async def token(request: web.Request) -> web.Response:
    """Client credentials grant with a JWT client assertion (SMART Backend Services; RFC 7523)."""
    form = await request.post() if request.content_type == "application/x-www-form-urlencoded" else {}
    if not form.get("client_assertion"):  # RFC 6749 §5.2: no client authentication → invalid_client, 401
        raise OAuthError("invalid_client", "client authentication missing: send client_assertion_type and "
                                           "client_assertion (application/x-www-form-urlencoded)", 401)
    answer = await request.app[keys.BACKEND_AUTH].token({k: str(v) for k, v in form.items()}, token_url(request))
    return web.Response(body=orjson.dumps(answer), content_type="application/json",
                        headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def setup_routes(app: web.Application) -> None:
    app.router.add_post(TOKEN_PATH, token, name="auth.token")
    app[keys.PUBLIC_ROUTES].add("auth.token")
    app[keys.ERROR_RENDERERS]["/auth"] = render_oauth_error


__all__ = ["setup_routes", "token_url"]
