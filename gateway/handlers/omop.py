"""OMOP routes (docs/omop.md): ``POST /omop/export`` and ``POST /omop/import``.

Configuration (TOML section ``[omop]``, read from ``Settings.extra["omop"]``)::

    [omop]
    pg_url = "postgresql://omop@db:5432/omop"   # the PostgreSQL database export/import schemas live in
    vocabulary = "/data/athena"                  # optional: a full OHDSI vocabulary download

The API never takes a database URL from the request: PostgreSQL targets are schemas of the configured
``pg_url``; CSV exports go to ``data_dir/exports/<name>``.
"""

from __future__ import annotations

import re
import time
import uuid

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest
from gateway.middlewares import requester_of
from gateway.services.omop import ExportTarget

OMOP = keys.OMOP
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


def _config(app: web.Application) -> dict:
    raw = app[keys.SETTINGS].extra.get("omop") or {}
    return dict(raw) if isinstance(raw, dict) else {}


async def _body(request: web.Request) -> dict:
    raw = await request.read()
    if not raw:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body: not JSON", expression=["$"]) from None
    if not isinstance(doc, dict):
        raise BadRequest("request body: a JSON object", expression=["$"])
    return doc


def _pg_url(app: web.Application) -> str:
    url = _config(app).get("pg_url")
    if not url:
        raise BadRequest("format: postgresql needs the site setting omop.pg_url", expression=["format"])
    return str(url)


async def export(request: web.Request) -> web.Response:
    doc = await _body(request)
    fmt = doc.get("format", "csv")
    replace = doc.get("replace", False)
    if not isinstance(replace, bool):
        raise BadRequest("replace: a boolean", expression=["replace"])
    if fmt == "csv":
        name = doc.get("name") or f"omop-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest("name: letters, digits, '_', '.', '-' (≤ 80)", expression=["name"])
        target = ExportTarget(csv_dir=request.app[keys.SETTINGS].data_dir / "exports" / name)
    elif fmt == "postgresql":
        schema = doc.get("schema")
        if not isinstance(schema, str):
            raise BadRequest("schema: required for format postgresql", expression=["schema"])
        target = ExportTarget(pg_url=_pg_url(request.app), schema=schema, replace=replace)
    else:
        raise BadRequest("format: 'csv' or 'postgresql'", expression=["format"])
    report = await request.app[OMOP].export(requester_of(request), target, gate=request.app[keys.GATE],
                                            audit=request.app[keys.AUDIT], path=request.path)
    if target.csv_dir is not None:
        report["target"] = {"csv": f"exports/{target.csv_dir.name}"}  # relative to the data dir
    return web.Response(body=orjson.dumps(report), content_type="application/json")


async def import_(request: web.Request) -> web.Response:
    doc = await _body(request)
    schema = doc.get("schema")
    if not isinstance(schema, str):
        raise BadRequest("schema: required", expression=["schema"])
    report = await request.app[OMOP].import_schema(requester_of(request), _pg_url(request.app), schema,
                                                   audit=request.app[keys.AUDIT], path=request.path)
    return web.Response(body=orjson.dumps(report), content_type="application/json")


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/omop/export", export, name="omop.export")
    app.router.add_post("/omop/import", import_, name="omop.load")


__all__ = ["OMOP", "setup_routes"]
