"""Liveness and readiness probes (public)."""

from __future__ import annotations

import os
from pathlib import Path

from aiohttp import web
from sqlalchemy import text

from gateway import __version__, keys


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP (``pid``: which server process answered; with
    ``processes`` > 1 the kernel spreads connections over several)."""
    return web.json_response({"status": "ok", "version": __version__, "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers."""
    db = request.app[keys.DB]
    try:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))
    except OSError as exc:  # connection refused and friends
        return web.json_response({"status": "unavailable", "database": type(exc).__name__}, status=503)
    return web.json_response({"status": "ready", "database": db.dialect})


#: The gateway's OpenAPI 3.1 document (kept in step with the router by tests/integration/test_openapi.py).
OPENAPI_PATH = Path(__file__).resolve().parents[2] / "openapi" / "fedgate.yaml"


async def openapi(request: web.Request) -> web.FileResponse:
    """The OpenAPI document for the gateway's own routes."""
    return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/yaml"})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/openapi.yaml", openapi, name="openapi")
    app[keys.PUBLIC_ROUTES].update({"healthz", "readyz", "openapi"})
