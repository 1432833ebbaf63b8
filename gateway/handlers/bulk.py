"""FHIR Bulk Data export routes (Bulk Data Access IG v2.0.0; docs/bulk-export.md), OperationOutcome errors.

- kick-off: ``GET|POST /fhir/$export``, ``/fhir/Patient/$export``, ``/fhir/Group/{id}/$export`` with
  ``Prefer: respond-async`` → 202 + ``Content-Location`` (the status URL)
- status: ``GET /fhir/_export/{job}`` → 202 + ``X-Progress`` + ``Retry-After`` while running, 200 + the
  manifest when done, an error status + OperationOutcome when it failed; ``DELETE`` cancels (202)
- files: ``GET /fhir/_export/{job}/{file}`` → ``application/fhir+ndjson``, to the requester who started it

Site settings (TOML section ``[export]``): ``deidentify_roles``, ``project``, ``page_size``, ``expire_s``,
``lease_s``, ``poll_s``, ``retry_after_s``, ``max_active``, ``worker``.
"""

from __future__ import annotations

from email.utils import formatdate

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, GatewayError, NotAcceptable
from gateway.handlers.fhir import FHIR_JSON, ID_RE, base_url, read_json_body
from gateway.middlewares import requester_of
from gateway.services.bulk import BulkExportService
from mappings.fhir.bulk import KickoffError, parameters_pairs

NDJSON = "application/fhir+ndjson"


def _svc(request: web.Request) -> BulkExportService:
    return request.app[keys.BULK_EXPORT]


def _prefer(request: web.Request) -> set[str]:
    return {p.strip().lower() for p in request.headers.get("Prefer", "").replace(";", ",").split(",") if p.strip()}


def _check_accept(request: web.Request) -> None:
    """IG: the kick-off's ``Accept`` is ``application/fhir+json`` (the OperationOutcome of an error)."""
    accept = request.headers.get("Accept")
    if not accept:
        return
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("application/fhir+json", "application/json", "*/*", "application/*"):
            return
    raise NotAcceptable(f"Accept {accept[:80]!r}: the $export kick-off answers application/fhir+json")


async def _kickoff(request: web.Request, level: str) -> web.Response:
    _check_accept(request)
    pairs = list(request.query.items())
    bad_body = None  # raised by the service after the gate has decided (a refused requester learns nothing)
    if request.method == "POST":
        try:
            pairs += parameters_pairs(await read_json_body(request))
        except KickoffError as exc:
            bad_body = BadRequest(str(exc), expression=[exc.param])
        except GatewayError as exc:
            bad_body = exc
    prefer = _prefer(request)
    group = request.match_info.get("id")
    job_id, _ = await _svc(request).kickoff(requester_of(request), level, group, pairs, str(request.url),
                                            respond_async="respond-async" in prefer,
                                            lenient="handling=lenient" in prefer, bad_body=bad_body)
    return web.Response(status=202, headers={"Content-Location": f"{base_url(request)}/_export/{job_id}"})


async def export_system(request: web.Request) -> web.Response:
    """``[base]/$export`` (IG "Endpoint - All Patients"... system level)."""
    return await _kickoff(request, "system")


async def export_patient(request: web.Request) -> web.Response:
    """``[base]/Patient/$export`` (IG "Endpoint - All Patients")."""
    return await _kickoff(request, "patient")


async def export_group(request: web.Request) -> web.Response:
    """``[base]/Group/[id]/$export`` (IG "Endpoint - Group of Patients")."""
    return await _kickoff(request, "group")


async def export_status(request: web.Request) -> web.Response:
    """IG "Bulk Data Status Request"."""
    svc = _svc(request)
    st = await svc.status(requester_of(request), request.match_info["job"])
    if st.state in ("queued", "running"):
        return web.Response(status=202, headers={"X-Progress": st.progress[:100],
                                                 "Retry-After": str(svc.config.retry_after_s)})
    expires = {"Expires": formatdate(st.expires_ts, usegmt=True)} if st.expires_ts else {}
    if st.state == "failed":
        body = {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing", "diagnostics": st.error}]}
        return web.Response(status=500, body=orjson.dumps(body), content_type=FHIR_JSON, headers=expires)
    base = f"{base_url(request)}/_export/{request.match_info['job']}"
    manifest = dict(st.manifest)
    for key in ("output", "error"):
        manifest[key] = [{**o, "url": f"{base}/{o['url']}"} for o in manifest[key]]
    return web.Response(body=orjson.dumps(manifest), content_type="application/json", headers=expires)


async def export_cancel(request: web.Request) -> web.Response:
    """IG "Delete a Bulk Data Request": 202, the job stops and its files are removed."""
    await _svc(request).cancel(requester_of(request), request.match_info["job"])
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": "export cancelled"}]}
    return web.Response(status=202, body=orjson.dumps(body), content_type=FHIR_JSON)


async def export_file(request: web.Request) -> web.StreamResponse:
    """IG "File Request": one NDJSON file, streamed from disk."""
    path = await _svc(request).file(requester_of(request), request.match_info["job"], request.match_info["file"])
    return web.FileResponse(path, headers={"Content-Type": NDJSON})


def setup_routes(app: web.Application) -> None:
    r = app.router
    i = "{id:" + ID_RE + "}"
    for path, handler, name in (("/fhir/$export", export_system, "fhir.export"),
                                ("/fhir/Patient/$export", export_patient, "fhir.export_patient"),
                                (f"/fhir/Group/{i}/$export", export_group, "fhir.export_group")):
        r.add_get(path, handler, name=name)
        r.add_post(path, handler, name=name + "_post")
    r.add_get("/fhir/_export/{job:[0-9a-f]{1,64}}", export_status, name="fhir.export_status")
    r.add_delete("/fhir/_export/{job:[0-9a-f]{1,64}}", export_cancel, name="fhir.export_cancel")
    r.add_get("/fhir/_export/{job:[0-9a-f]{1,64}}/{file}", export_file,
              name="fhir.export_file")


__all__ = ["setup_routes"]
