"""openapi/fedgate.yaml and the router describe the same routes (path template, method, operationId = route name)."""

from __future__ import annotations

import yaml
from aiohttp import web

from gateway import keys
from gateway.app import create_app
from gateway.handlers.health import OPENAPI_PATH

METHODS = {"get", "put", "post", "delete", "patch"}


def _spec_routes(spec: dict) -> set[tuple[str, str, str]]:
    out = set()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                out.add((path, method.upper(), op.get("operationId", "")))
    return out


def _router_routes(app: web.Application) -> set[tuple[str, str, str]]:
    out = set()
    for resource in app.router.resources():
        for route in resource:
            if route.method in ("HEAD", "OPTIONS"):
                continue
            out.add((resource.canonical, route.method, resource.name or ""))
    return out


def test_spec_is_openapi_31():
    spec = yaml.safe_load(OPENAPI_PATH.read_text())
    assert spec["openapi"].startswith("3.1")
    ops = [op["operationId"] for item in spec["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ops) == len(set(ops)), "operationIds must be unique"


def test_router_and_spec_in_step(settings):
    app = create_app(settings)
    spec = yaml.safe_load(OPENAPI_PATH.read_text())
    routed, documented = _router_routes(app), _spec_routes(spec)
    assert not routed - documented, f"routes missing from openapi/fedgate.yaml: {sorted(routed - documented)}"
    assert not documented - routed, f"documented but not routed: {sorted(documented - routed)}"


def test_public_routes_are_marked_public(settings):
    app = create_app(settings)
    spec = yaml.safe_load(OPENAPI_PATH.read_text())
    public_in_spec = {op["operationId"] for item in spec["paths"].values() for m, op in item.items()
                      if m in METHODS and op.get("security") == []}
    assert public_in_spec == app[keys.PUBLIC_ROUTES]


async def test_openapi_served_publicly(gateway, http):
    async with http.get(gateway.url + "/openapi.yaml") as r:
        assert r.status == 200
        assert yaml.safe_load(await r.text())["info"]["title"] == "fedgate"
