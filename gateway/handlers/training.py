"""Federated training routes (docs/training.md).

Hub (normal bearer token; analyst or admin with a research purpose):
``POST /training/runs`` start, ``GET /training/runs`` list, ``GET /training/runs/{run}`` progress per round
and site + lineage, ``POST /training/runs/{run}/cancel``, ``GET /training/models`` every produced version,
``GET /training/models/{name}/{version}/model.pt`` (TorchScript), ``POST /training/models/{name}/{version}/deploy``
(admin; install + activate at sites; roll back by deploying an older version).

Site: ``POST /federation/train/round`` and ``POST /federation/models/deploy`` authenticate themselves like the
federation routes (a hub → site ES256 token over the exact body, or the analyst's own token);
``GET /federation/train/key`` gives the site's X25519 public key for secure aggregation to a hub (same auth);
``GET /training/site/runs/{run}`` shows the site's own manifests to its admins.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import NotFound
from gateway.handlers.federation import _authenticate, _json
from gateway.middlewares import requester_of
from gateway.services.training_hub import TrainingHub

# the keys these routes use, by their short names (gateway/app.py builds the services)
SITE, HUB = keys.TRAINING_SITE, keys.TRAINING_HUB


def _resp(doc, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _hub(request: web.Request) -> TrainingHub:
    hub = request.app[HUB]
    if hub is None:
        raise NotFound("this gateway is not configured as a federation hub (federation.role)")
    return hub


# ------------------------------------------------------------------------------------------------ hub
async def start_run(request: web.Request) -> web.Response:
    _, doc = await _json(request)
    return _resp(await _hub(request).start(requester_of(request), doc), 201)


async def list_runs(request: web.Request) -> web.Response:
    return _resp({"runs": await _hub(request).list(requester_of(request))})


async def get_run(request: web.Request) -> web.Response:
    return _resp(await _hub(request).get(requester_of(request), request.match_info["run"]))


async def cancel_run(request: web.Request) -> web.Response:
    return _resp(await _hub(request).cancel(requester_of(request), request.match_info["run"]))


async def list_models(request: web.Request) -> web.Response:
    return _resp({"models": await _hub(request).models(requester_of(request), request.query.get("name"))})


async def model_file(request: web.Request) -> web.Response:
    requester_of(request)
    data, _ = await _hub(request).model_bytes(request.match_info["name"], request.match_info["version"])
    return web.Response(body=data, content_type="application/octet-stream")


async def deploy_model(request: web.Request) -> web.Response:
    doc = (await _json(request))[1] if (await request.read()).strip() else {}
    return _resp(await _hub(request).deploy(requester_of(request), request.match_info["name"],
                                            request.match_info["version"], doc))


# ----------------------------------------------------------------------------------------------- site
async def site_round(request: web.Request) -> web.Response:
    body, doc = await _json(request)
    requester, via = await _authenticate(request, body)
    return _resp(await request.app[SITE].round(requester, doc, hub=via, path=request.path))


async def site_key(request: web.Request) -> web.Response:
    await _authenticate(request, await request.read())  # a hub token (over the empty body) or an analyst token
    return _resp({"site": request.app[keys.SETTINGS].site_id, "public_key": request.app[SITE].keys().public_b64(),
                  "algorithm": "X25519"})


async def site_deploy(request: web.Request) -> web.Response:
    body, doc = await _json(request)
    requester, via = await _authenticate(request, body)
    return _resp(await request.app[SITE].deploy(requester, doc, request.app[keys.INFERENCE], hub=via, path=request.path))


async def site_manifests(request: web.Request) -> web.Response:
    return _resp({"rounds": await request.app[SITE].manifests(requester_of(request), request.match_info["run"])})


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/training/runs", start_run, name="training.start")
    r.add_get("/training/runs", list_runs, name="training.list")
    r.add_get("/training/runs/{run}", get_run, name="training.get")
    r.add_post("/training/runs/{run}/cancel", cancel_run, name="training.cancel")
    r.add_get("/training/models", list_models, name="training.models")
    r.add_get("/training/models/{name}/{version}/model.pt", model_file, name="training.model_file")
    r.add_post("/training/models/{name}/{version}/deploy", deploy_model, name="training.deploy")
    r.add_get("/training/site/runs/{run}", site_manifests, name="training.site_manifests")
    r.add_post("/federation/train/round", site_round, name="federation.train_round")
    r.add_get("/federation/train/key", site_key, name="federation.train_key")
    r.add_post("/federation/models/deploy", site_deploy, name="federation.deploy")
    # the site routes authenticate in the handler (hub token or analyst token)
    app[keys.PUBLIC_ROUTES].update({"federation.train_round", "federation.deploy", "federation.train_key"})


__all__ = ["setup_routes", "SITE", "HUB"]
