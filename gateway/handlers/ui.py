"""The web console at ``/ui`` (issue 28, docs/ui.md): HTTP <-> service translation only.

* pages (``/ui/``, ``/ui/{view}``) are shells without data, public like the viewer's static files: the
  browser signs in on the viewer's sign-in page (``/viewer/login``, same token in ``sessionStorage``) and
  htmx loads every fragment with ``Authorization: Bearer`` (``static/console.js``);
* fragments (``/ui/fragments/...``) need that token and call the same services as the JSON API with the
  signed-in requester — the federation hub's query, the consent report, inference, training, audit — so the
  console shows exactly what its user may see; errors are problem+json (shown in words by console.js);
* ``/ui/static/{name}``: the console's own CSS/JS and the htmx/Vega builds installed by
  scripts/setup.d/60-ui-assets.sh (nothing is fetched from the internet at run time).
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.handlers.viewer import MOUNT as VIEWER
from gateway.handlers.viewer import TOKEN_KEY
from gateway.middlewares import requester_of
from gateway.services import audit as audit_service
from gateway.ui import views

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
ASSETS = UI_DIR / "assets" / "node_modules"
#: served name → file (the console's own, or a build of an npm package)
STATIC = {
    "console.css": UI_DIR / "static" / "console.css",
    "console.js": UI_DIR / "static" / "console.js",
    "htmx.min.js": ASSETS / "htmx.org" / "dist" / "htmx.min.js",
    "vega.min.js": ASSETS / "vega" / "build" / "vega.min.js",
    "vega-lite.min.js": ASSETS / "vega-lite" / "build" / "vega-lite.min.js",
    "vega-embed.min.js": ASSETS / "vega-embed" / "build" / "vega-embed.min.js",
}
VIEWS = {"cohort": "Cohort builder", "consent": "Consent", "models": "Models and jobs", "training": "Training runs",
         "audit": "Audit"}
HUB_VIEWS = ("cohort", "training")
ENV: web.AppKey[jinja2.Environment] = web.AppKey("ui_env", jinja2.Environment)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(UI_DIR / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["cell"] = views.cell
    env.filters["when"] = views.when
    env.filters["job_results"] = views.job_results
    env.filters["spec"] = lambda spec: orjson.dumps(spec).decode()
    return env


def _render(request: web.Request, template: str, **ctx) -> web.Response:
    html = request.app[ENV].get_template(template).render(**ctx)
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


def _is_hub(request: web.Request) -> bool:
    return request.app[keys.FEDERATION_HUB] is not None


def _page_ctx(request: web.Request, view: str) -> dict:
    settings = request.app[keys.SETTINGS]
    hub = _is_hub(request)
    nav = [(v, title) for v, title in VIEWS.items() if hub or v not in HUB_VIEWS]
    return {"view": view, "title": VIEWS.get(view, "Console"), "nav": nav, "site": settings.site_id, "hub": hub,
            "token_key": TOKEN_KEY, "login": f"{VIEWER}/login", "views": VIEWS}


# ------------------------------------------------------------------------------------------------ pages
async def index(request: web.Request) -> web.Response:
    ctx = _page_ctx(request, "index")
    fed = request.app[keys.FEDERATION_HUB]
    ctx["sites"] = [{"id": s.id, "url": s.url} for s in fed.cfg.sites] if fed is not None else []
    return _render(request, "index.html", **ctx)


async def page(request: web.Request) -> web.Response:
    view = request.match_info["view"]
    if view not in VIEWS:
        raise NotFound(f"no console view {view!r}")
    ctx = _page_ctx(request, view)
    if view in HUB_VIEWS and not ctx["hub"]:
        ctx["not_hub"] = True
    if view == "models":
        ctx["models"] = []
    return _render(request, f"{view}.html", **ctx)


async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC.get(name)
    if path is None:
        raise NotFound(f"no console asset {name!r}")
    if not path.is_file():
        raise GatewayError("the console's browser assets are not installed: run scripts/setup "
                           "(scripts/setup.d/60-ui-assets.sh)", status=503)
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


# ------------------------------------------------------------------------------------------------ fragments
async def cohort_run(request: web.Request) -> web.Response:
    """The cohort form's JSON (``cohort_json``, the body ``fedgate query`` takes) → the hub's query."""
    hub = request.app[keys.FEDERATION_HUB]
    if hub is None:
        raise NotFound("this gateway is not configured as a federation hub (federation.role)")
    form = await request.post()
    text = form.get("cohort_json")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("cohort_json: the cohort definition (JSON) is empty", expression=["cohort_json"])
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"cohort_json: not JSON ({exc})", expression=["cohort_json"]) from None
    if not isinstance(doc, dict):
        raise BadRequest("cohort_json: a JSON object with 'cohort'", expression=["cohort_json"])
    requester = requester_of(request)
    answer = await hub.query(requester, doc)
    return _render(request, "_cohort_result.html", **views.cohort_result(answer, requester.purpose.describe()))


async def consent_overview(request: web.Request) -> web.Response:
    report = request.app[keys.CONSENT_REPORT]
    requester = requester_of(request)
    matrix = await report.matrix(requester)
    withdrawals = await report.withdrawals(requester)
    return _render(request, "_consent.html", **views.consent_matrix(matrix, withdrawals))


async def consent_decision(request: web.Request) -> web.Response:
    q = request.query
    result = await request.app[keys.CONSENT_REPORT].decision(requester_of(request), q.get("patient"),
                                                                  q.get("purpose"))
    return _render(request, "_decision.html", d=result)


async def models(request: web.Request) -> web.Response:
    svc = request.app[keys.INFERENCE]
    requester = requester_of(request)
    jobs = await svc.jobs(requester, q if (q := request.query.get("state")) else None, None, 50)
    cards = await svc.cards()
    return _render(request, "_models.html", cards=cards, jobs=jobs, viewer=VIEWER)


async def monitoring(request: web.Request) -> web.Response:
    q = request.query
    if not q.get("model"):
        raise BadRequest("model: choose a model", expression=["model"])
    by = q.get("by") or "manufacturer"
    if by not in ("manufacturer", "scanner_model", "protocol"):
        raise BadRequest("by: manufacturer, scanner_model or protocol", expression=["by"])
    name, _, version = q["model"].partition("@")
    report = await request.app[keys.INFERENCE].monitoring(requester_of(request), name, version or None, None, by)
    return _render(request, "_monitoring.html", **views.monitoring(report, by))


async def training(request: web.Request) -> web.Response:
    hub = request.app[keys.TRAINING_HUB]
    if hub is None:
        raise NotFound("this gateway is not configured as a federation hub (federation.role)")
    requester = requester_of(request)
    run_id = request.query.get("run")
    if run_id:
        return _render(request, "_run.html", **views.training_run(await hub.get(requester, run_id)))
    return _render(request, "_runs.html", runs=await hub.list(requester))


async def audit(request: web.Request) -> web.Response:
    q = request.query
    params: list[tuple[str, str]] = [("_count", q.get("count") or "50")]
    if q.get("patient"):
        params.append(("patient", q["patient"].strip()))
    if q.get("user"):
        params.append(("agent", q["user"].strip()))
    if q.get("outcome"):
        params.append(("outcome", q["outcome"]))
    if q.get("from"):
        params.append(("date", "ge" + q["from"]))
    if q.get("to"):
        params.append(("date", "le" + q["to"]))
    events, total = await audit_service.admin_search(request.app[keys.DB], request.app[keys.AUDIT],
                                                     requester_of(request), params)
    return _render(request, "_audit.html", rows=views.audit_rows(events), total=total)


async def audit_verify(request: web.Request) -> web.Response:
    result = await audit_service.admin_verify(request.app[keys.DB], request.app[keys.AUDIT],
                                              request.app[keys.SETTINGS], requester_of(request))
    return _render(request, "_verify.html", result=result)


def setup_routes(app: web.Application) -> None:
    app[ENV] = _env()
    r = app.router
    r.add_get("/ui", root, name="ui.root")
    r.add_get("/ui/", index, name="ui")
    r.add_get("/ui/static/{name}", static, name="ui.static")
    r.add_get("/ui/{view}", page, name="ui.page")
    r.add_post("/ui/fragments/cohort", cohort_run, name="ui.cohort")
    r.add_get("/ui/fragments/consent", consent_overview, name="ui.consent")
    r.add_get("/ui/fragments/consent/decision", consent_decision, name="ui.consent_decision")
    r.add_get("/ui/fragments/models", models, name="ui.models")
    r.add_get("/ui/fragments/monitoring", monitoring, name="ui.monitoring")
    r.add_get("/ui/fragments/training", training, name="ui.training")
    r.add_get("/ui/fragments/audit", audit, name="ui.audit")
    r.add_get("/ui/fragments/audit/verify", audit_verify, name="ui.audit_verify")
    app[keys.PUBLIC_ROUTES].update({"ui.root", "ui", "ui.static", "ui.page"})


__all__ = ["setup_routes"]
