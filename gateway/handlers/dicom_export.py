"""Imaging cohort export routes (issue #24; docs/deidentification.md): ``POST /export/dicom`` starts a job
(202 + ``Content-Location``), ``GET /export/dicom/{job}`` polls it (202 with ``X-Progress`` and
``Retry-After`` while it runs, 200 with the per-study report when done).  The body names the studies
(``"studies": [UIDs]``) or a federation cohort (``"cohort": {...}``, the language of ``POST /federation/query``),
resolved at once through the gated cohort compiler into the studies holding the requester's permitted instances.

Targets are never taken from the request as paths or URLs: a folder is ``data_dir/exports/dicom/<name>``
(new), a STOW-RS target is a name from the site's configuration::

    [export.stow_targets.research-pacs]
    url = "https://research-pacs.example.org/dicom-web"
    token_file = "/run/secrets/research-pacs-token"   # optional bearer token
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.middlewares import requester_of
from gateway.services.dicom_export import ExportTarget
from gateway.services.dicomweb import check_study_uid
from mappings.deid.dicom import DeidOptions

MAX_STUDIES = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_OPTIONS = {"clean_descriptors": "clean_descriptors", "retain_patient_characteristics": "patient_characteristics",
            "retain_device_identity": "device_identity"}


def _stow_target(app: web.Application, name: str) -> ExportTarget:
    targets = (app[keys.SETTINGS].extra.get("export") or {}).get("stow_targets") or {}
    conf = targets.get(name) if isinstance(targets, dict) else None
    if isinstance(conf, str):
        conf = {"url": conf}
    if not isinstance(conf, dict) or not isinstance(conf.get("url"), str):
        raise BadRequest(f"target.stow: {name!r} is not a configured STOW-RS target (export.stow_targets)",
                         expression=["target.stow"])
    token_file = conf.get("token_file")
    if token_file is not None and not Path(str(token_file)).is_file():
        raise BadRequest(f"target.stow: the token file of {name!r} is not readable", expression=["target.stow"])
    return ExportTarget(stow_url=conf["url"], stow_token_file=str(token_file) if token_file else None)


def _parse(app: web.Application, doc) -> tuple[list[str] | None, ExportTarget, str | None, DeidOptions, dict]:
    if not isinstance(doc, dict):
        raise BadRequest("request body: a JSON object", expression=["$"])
    if ("studies" in doc) == ("cohort" in doc):
        raise BadRequest("give either studies (Study Instance UIDs) or cohort (a federation cohort)",
                         expression=["studies"])
    studies = doc.get("studies")
    if "cohort" in doc:
        if not isinstance(doc["cohort"], dict):
            raise BadRequest("cohort: a cohort criterion object (the federation cohort language)",
                             expression=["cohort"])
    elif not isinstance(studies, list) or not studies or not all(isinstance(s, str) for s in studies):
        raise BadRequest("studies: a non-empty list of Study Instance UIDs", expression=["studies"])
    elif len(studies) > MAX_STUDIES:
        raise BadRequest(f"studies: at most {MAX_STUDIES} per job", expression=["studies"])
    else:
        studies = [check_study_uid(s) for s in studies]
    project = doc.get("project")
    if project is not None and (not isinstance(project, str) or not _NAME.match(project)):
        raise BadRequest("project: letters, digits, '_', '.', '-' (≤ 80)", expression=["project"])
    target = doc.get("target")
    if not isinstance(target, dict) or len(target) != 1 or not isinstance(next(iter(target.values())), str):
        raise BadRequest('target: {"folder": name} or {"stow": configured target name}', expression=["target"])
    (kind, name), = target.items()
    if kind == "folder":
        if not _NAME.match(name):
            raise BadRequest("target.folder: letters, digits, '_', '.', '-' (≤ 80)", expression=["target.folder"])
        folder = app[keys.SETTINGS].data_dir / "exports" / "dicom" / name
        if folder.exists():
            raise BadRequest(f"target.folder: {name!r} exists (choose a new name)", expression=["target.folder"])
        out = ExportTarget(folder=folder)
    elif kind == "stow":
        out = _stow_target(app, name)
    else:
        raise BadRequest('target: {"folder": name} or {"stow": name}', expression=["target"])
    opts = doc.get("options") or {}
    if not isinstance(opts, dict) or not set(opts) <= set(_OPTIONS) or not all(isinstance(v, bool) for v in opts.values()):
        raise BadRequest(f"options: booleans among {', '.join(_OPTIONS)}", expression=["options"])
    options = DeidOptions(**{_OPTIONS[k]: v for k, v in opts.items()})
    summary = {"studies": len(studies) if studies is not None else None, "project": project,
               "target": {kind: name}, "options": opts}
    return studies, out, project, options, summary


async def start(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        doc = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise BadRequest("request body: not JSON", expression=["$"]) from None
    studies, target, project, options, summary = _parse(request.app, doc)
    requester = requester_of(request)
    if project is not None and project != requester.attributes.get("project"):
        # the keys of a project are only for the project the token attests: naming another project would
        # link this requester's copies to that project's pseudonyms
        raise Forbidden("project: only the project your token attests (attribute 'project') may be named")
    await request.app[keys.GATE].scope_for(requester)  # an unusable purpose fails here, before any job exists
    if studies is None:  # a cohort: the studies it selects at this site, through the gate (resolved now)
        studies = await request.app[keys.DICOM_EXPORT].cohort_studies(requester, doc["cohort"],
                                                                      expand=request.app[keys.CODE_EXPANDER])
        if len(studies) > MAX_STUDIES:
            raise BadRequest(f"cohort: selects {len(studies)} studies, at most {MAX_STUDIES} per job",
                             expression=["cohort"])
        summary = summary | {"cohort": True, "studies": len(studies)}
    job_id = await request.app[keys.DICOM_EXPORT_JOBS].start(requester, studies, target, project=project,
                                                         options=options, request_doc=summary)
    location = f"/export/dicom/{job_id}"
    return web.Response(status=202, body=orjson.dumps({"id": job_id, "state": "running", "status": location}),
                        content_type="application/json", headers={"Content-Location": location})


async def status(request: web.Request) -> web.Response:
    requester = requester_of(request)
    await request.app[keys.GATE].scope_for(requester)
    job = await request.app[keys.DICOM_EXPORT_JOBS].get(request.match_info["job"])
    if job is None or (job["subject"] != requester.subject and not requester.is_admin):
        raise NotFound("no such export job")
    body = {"id": job["job_id"], "state": job["state"], "progress": {"studies": job["done"], "of": job["total"]},
            "request": orjson.loads(job["request"])}
    if job["report"]:
        body["report"] = orjson.loads(job["report"])
    if job["error"]:
        body["error"] = job["error"]
    headers = {}
    code = 200
    if job["state"] in ("queued", "running"):
        code = 202
        headers = {"X-Progress": f"{job['done']}/{job['total']} studies", "Retry-After": "2"}
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json", headers=headers)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/export/dicom", start, name="export.dicom_start")
    app.router.add_get("/export/dicom/{job}", status, name="export.dicom_status")


__all__ = ["setup_routes"]
