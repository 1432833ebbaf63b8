"""DICOMweb routes under /dicomweb (DICOM PS3.18): STOW-RS, QIDO-RS, WADO-RS.

HTTP concerns only — media types, multipart framing, Accept negotiation (the shared pieces in
``gateway/handlers/dicomweb_http.py``, STOW bodies in ``gateway/handlers/stow_body.py``); the work is in
``gateway/services/dicomweb.py``, whose retrieve returns a
:class:`~gateway.services.dicom_retrieve.Retrieval` that reads the stored instances.  Errors outside a
STOW response payload are RFC 9457 problem details (the default renderer) with the PS3.18 status code.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, GatewayError, NotAcceptable, NotFound
from gateway.handlers.dicomweb_http import DICOM_JSON, Accept, MultipartWriter, media_with_ts, send_parts, urls
from gateway.handlers.stow_body import _receive, _stow_media
from gateway.middlewares import requester_of
from gateway.services.dicomweb import DicomwebService, Retrieval, check_study_uid
from mappings.dicom import attributes as attrs
from mappings.dicom import negotiate
from mappings.dicom import pixels
from mappings.dicom.qido import QidoError, QidoQuery
from mappings.dicom.urls import DicomwebUrls

log = logging.getLogger(__name__)

#: stored bytes of the instances transcoded before a WADO response starts (see _retrieve)
TRANSCODE_AHEAD = 64 * 1024 * 1024


def _svc(request: web.Request) -> DicomwebService:
    return request.app[keys.DICOMWEB]


def base_url(request: web.Request) -> str:
    """The DICOMweb service root as the client reached it (see :func:`dicomweb_http.urls`)."""
    return urls(request).base


# ------------------------------------------------------------------------------------------- STOW-RS


async def stow(request: web.Request) -> web.Response:
    """STOW-RS Store Instances (PS3.18 §10.5): per-instance outcome, 200 / 202 / 409 (§10.5.3)."""
    boundary = _stow_media(request)
    study = request.match_info.get("study")
    if study is not None:
        check_study_uid(study)
    svc = _svc(request)
    feed = svc.parse_feed(study)
    parts = await _receive(request, boundary, feed.add)
    status, body = await svc.store(requester_of(request), parts, study, urls(request), feed)
    return web.Response(status=status, body=orjson.dumps(body), content_type=DICOM_JSON)


# ------------------------------------------------------------------------------------------- QIDO-RS


async def _search(request: web.Request, level: str) -> web.Response:
    """QIDO-RS Search (PS3.18 §10.6): application/dicom+json, X-Total-Count = matches before paging.
    Under ``deid_wado`` a de-identified requester's answers are de-identified like WADO-RS metadata (same
    profile, same project UIDs, RetrieveURLs under those UIDs) and its UIDs, in the path or as match keys,
    may be the project's; what the profile withholds (burned-in annotation) is neither answered nor counted,
    as what the consent gate refuses."""
    Accept.of(request).json()
    study = request.match_info.get("study")
    series = request.match_info.get("series")
    for uid in (study, series):
        if uid is not None:
            check_study_uid(uid)
    deid = _deid_keys(request)
    try:
        q = QidoQuery.parse(level, list(request.query.items()), base=base_url(request), study_uid=study,
                            series_uid=series)
    except QidoError as exc:
        raise BadRequest(str(exc), expression=[exc.param]) from None
    svc = _svc(request)
    patients: list | None = None
    if deid is not None:
        await _source_query(request, svc, deid, q)
        patients = []
    notes: list[str] = []  # (admins: conflicting studies among the results)
    results, total = await svc.search(requester_of(request), level, q, notes, patients,
                                      releasable_only=deid is not None)
    if deid is not None:
        found = len(results)
        results = await asyncio.to_thread(_deidentified_results, results, patients or [], deid, q.base, level)
        total -= found - len(results)  # (the search matched releasable instances only: normally none dropped)
    headers = {"X-Total-Count": str(total)}
    if q.offset + len(results) < total:
        notes.insert(0, f"{total - q.offset - len(results)} more results; use offset")
    if notes:
        headers["Warning"] = ", ".join(f'299 fedgate "{n}"' for n in notes)
    return web.Response(body=orjson.dumps(results), content_type=DICOM_JSON, headers=headers)


async def search_studies(request: web.Request) -> web.Response:
    return await _search(request, "studies")


async def search_series(request: web.Request) -> web.Response:
    return await _search(request, "series")


async def search_instances(request: web.Request) -> web.Response:
    return await _search(request, "instances")


# ------------------------------------------------------------------------------------------- WADO-RS


# ------------------------------------------------------------------ de-identified WADO-RS
#: Bulk data a de-identified answer may carry: the pixel data (never changed by the profile)
_DEID_BULK_TAGS = frozenset({"7FE00010", "7FE00008", "7FE00009"})


def _deid_keys(request: web.Request):
    """The project keys when this requester gets de-identified WADO-RS answers (settings ``deid_wado`` and
    ``deid_policy``), else None."""
    policy = request.app[keys.DEID]
    requester = requester_of(request)
    if policy is None or not policy.wado_deidentifies(requester):
        return None
    return policy.keys_for(requester)


def _releasable(row: dict) -> bool:
    """False for an instance the profile withholds (burned-in annotation: mappings.deid.dicom)."""
    from pydicom.dataset import Dataset

    from mappings.deid.dicom import burned_in_reason

    meta = orjson.loads(row["metadata"]) if row.get("metadata") else {}
    ds = Dataset()
    ds.SOPClassUID = row.get("sop_class_uid") or ""
    flag = (meta.get("00280301") or {}).get("Value") or []
    if flag:
        ds.BurnedInAnnotation = str(flag[0])
    return burned_in_reason(ds) is None


async def _source_study(request: web.Request, deid, uid: str) -> str:
    """The stored Study Instance UID a de-identified requester means by ``uid`` (a project UID, or a source
    UID as it is)."""
    found = await request.app[keys.DEID].uids.source_study(deid, uid, _svc(request).stored_study_uids)
    return found or uid


def _named(row: dict, deid, series: str | None, sop: str | None) -> bool:
    """Whether ``row`` is the series/instance named by a source or a project UID."""
    return ((series is None or series in (row["series_uid"], deid.uid_for(row["series_uid"])))
            and (sop is None or sop in (row["sop_uid"], deid.uid_for(row["sop_uid"]))))


async def _visible(request: web.Request, svc: DicomwebService, *, metadata: bool, deid) -> Retrieval:
    """The instances the request names, through the gate; for a de-identified answer without the
    instances the profile withholds (404 when none is left: a withheld instance looks like a missing one).
    A de-identified requester may name them by the project's UIDs (those its answers carry)."""
    m = request.match_info
    study, series, sop = check_study_uid(m["study"]), m.get("series"), m.get("instance")
    if deid is None:
        return await svc.retrieve(requester_of(request), study, series, sop, metadata=metadata)
    study = await _source_study(request, deid, study)
    found = await svc.retrieve(requester_of(request), study, metadata=True)
    found = found.only([r for r in found if _named(r, deid, series, sop) and _releasable(r)])
    if not found.rows:
        raise NotFound("no instance to release (not found, or withheld: burned-in annotation)")
    return found


#: Attributes a de-identified QIDO-RS answer may be matched on although the profile changes them: UIDs,
#: translated to the source UIDs first.  Every other Table E.1-1 attribute is refused as a match key (matching
#: on a name, an ID or a real date would tell the requester what the answer hides).
_UID_KEYS = frozenset({"0020000D", "0020000E", "00080018"})


async def _source_query(request: web.Request, svc: DicomwebService, deid, q: QidoQuery) -> None:
    """The match keys and path UIDs of a de-identified requester's QIDO-RS query, in source UIDs."""
    from mappings.deid.table_e11 import TABLE_E1_1

    if q.study_uid is not None:
        q.study_uid = await _source_study(request, deid, q.study_uid)
    studies = [q.study_uid] if q.study_uid else []
    matches = []
    for attr, value in q.matches:
        if attr.tag in _UID_KEYS:
            if attr.tag == "0020000D":
                value = "\\".join([await _source_study(request, deid, v) for v in value.replace(",", "\\").split("\\")])
                studies += value.split("\\")
        elif int(attr.tag, 16) in TABLE_E1_1 and TABLE_E1_1[int(attr.tag, 16)][1] != "K":
            raise BadRequest(f"{attr.keyword}: not a match key of de-identified answers (the profile removes or "
                             "replaces it)", expression=[attr.keyword])
        matches.append((attr, value))
    if q.series_uid is not None or any(a.tag in ("0020000E", "00080018") for a, _ in matches):
        if len(studies) != 1:
            raise BadRequest("de-identified answers: a series or instance UID is looked up within one study "
                             "(give the study in the path or as StudyInstanceUID)", expression=["StudyInstanceUID"])
        try:
            rows = (await svc.retrieve(requester_of(request), studies[0], metadata=False)).rows
        except NotFound:
            rows = []
        series_of = {deid.uid_for(r["series_uid"]): r["series_uid"] for r in rows}
        sop_of = {deid.uid_for(r["sop_uid"]): r["sop_uid"] for r in rows}
        if q.series_uid is not None:
            q.series_uid = series_of.get(q.series_uid, q.series_uid)
        for i, (attr, value) in enumerate(matches):
            table = series_of if attr.tag == "0020000E" else sop_of if attr.tag == "00080018" else None
            if table is not None:
                matches[i] = (attr, "\\".join(table.get(v, v) for v in value.replace(",", "\\").split("\\")))
    q.matches = matches


def _deidentified_results(results: list[dict], patients: list, deid, base: str, level: str) -> list[dict]:
    """QIDO-RS answers de-identified as WADO-RS metadata is (blocking: run off the event loop): the same
    profile, the project's UIDs, RetrieveURL under them; answers the profile withholds are left out."""
    from pydicom.dataset import Dataset

    from mappings.deid.dicom import Withheld, deidentify_dataset

    out = []
    for doc, pid in zip(results, patients):
        ds = Dataset.from_json({k: v for k, v in doc.items() if k != "00081190"})
        done = deidentify_dataset(ds, deid, patient_key=pid)
        if isinstance(done, Withheld):
            continue
        res = _strip_bulk(done.to_json_dict(bulk_data_threshold=1 << 30))
        uids = [(res.get(t) or {}).get("Value", [None])[0] for t in ("0020000D", "0020000E", "00080018")]
        url = (DicomwebUrls(base).study(uids[0]) if level == "studies" else
               DicomwebUrls(base).series(uids[0], uids[1]) if level == "series" else
               DicomwebUrls(base).instance(uids[0], uids[1], uids[2]))
        res["00081190"] = {"vr": "UR", "Value": [url]}
        out.append(dict(sorted(res.items())))
    return out


def _cut_short(request: web.Request, resp: web.StreamResponse, exc: BaseException) -> web.StreamResponse:
    """A multipart answer that failed after its status line went out: the connection is closed (the client
    sees a truncated body, never an error status inside a 200)."""
    log.warning("WADO response cut short", extra={"error_type": type(exc).__name__})
    resp.force_close()
    if request.transport is not None:
        request.transport.close()
    return resp


async def _end_multipart(resp: web.StreamResponse, boundary: str) -> web.StreamResponse:
    await resp.write(f"--{boundary}--\r\n".encode())
    await resp.write_eof()
    return resp


async def _retrieve_deidentified(request: web.Request, found: Retrieval, deid,
                                 wants: list[negotiate.Want]) -> web.StreamResponse:
    """Instances de-identified on the fly (worker threads), each as stored otherwise (no transcoding)."""
    from mappings.deid.dicom import Withheld

    want = Accept.instances_as_stored(wants)

    async def one(row: dict) -> bytes | None:
        out = await found.deidentified(row, deid)
        return None if isinstance(out, Withheld) else out

    rows = found.rows
    if len(rows) == 1 and not want.multipart:
        body = await one(rows[0])
        if body is None:
            raise NotFound("no instance to release (withheld)")
        return web.Response(body=body, headers={"Content-Type": media_with_ts(negotiate.DICOM, rows[0]["transfer_syntax"])})
    first = await one(rows[0])  # before the status line: an unreadable instance is an error, not a cut 200
    out = MultipartWriter(request, negotiate.DICOM)
    await out.start()
    try:
        for i, row in enumerate(rows):
            body = first if i == 0 else await one(row)
            if body is None:
                continue
            await out.write(out.head(media_with_ts(negotiate.DICOM, row["transfer_syntax"])) + body + b"\r\n")
    except (GatewayError, OSError, ValueError) as exc:  # past the status line: end the connection
        return out.cut_short(exc)
    return await out.end()


def _deidentified_metadata(rows: list[dict], deid) -> list[dict]:
    """DICOM JSON of the instances de-identified (blocking: run off the event loop); bulk data URIs left
    out (pixel data is reachable through /frames, which serves it unchanged)."""
    from pydicom.dataset import Dataset

    from mappings.deid.dicom import Withheld, deidentify_dataset

    out = []
    for r in rows:
        meta = orjson.loads(r["metadata"]) if r["metadata"] else {}
        meta = {k: v for k, v in meta.items() if not (isinstance(v, dict) and ("BulkDataURI" in v or "InlineBinary" in v))}
        ds = Dataset.from_json(meta)
        done = deidentify_dataset(ds, deid, patient_key=r.get("patient_id"))
        if not isinstance(done, Withheld):
            out.append(_strip_bulk(done.to_json_dict(bulk_data_threshold=1 << 30)))
    return out


def _strip_bulk(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if not (isinstance(v, dict) and ("BulkDataURI" in v or "InlineBinary" in v))}


# ------------------------------------------------------------------ instances, metadata, frames, rendered, bulk data
async def _retrieve(request: web.Request) -> web.StreamResponse:
    """WADO-RS Retrieve Study/Series/Instance (PS3.18 §10.4.1): multipart/related application/dicom."""
    accept = Accept.of(request)
    wants = accept.wants(negotiate.DICOM)
    deid = _deid_keys(request)
    found = await _visible(request, _svc(request), metadata=False, deid=deid)
    if deid is not None:
        return await _retrieve_deidentified(request, found, deid, wants)
    want, plan = accept.instances(wants, found.rows)
    rows = found.rows
    if len(rows) == 1 and not want.multipart:
        # single part application/dicom (one instance): the file itself
        [row], [target] = rows, plan
        body = await found.read(row) if target is None else await found.transcode(row, target)
        return web.Response(body=body, headers={"Content-Type": media_with_ts(negotiate.DICOM, target or row["transfer_syntax"])})
    if request.method != "HEAD" and all(t is None for t in plan):
        return await _retrieve_as_stored(request, found)
    # transcoding is decided before the response starts: the instances to transcode (up to TRANSCODE_AHEAD
    # stored bytes) are transcoded first, so one that cannot be answers 406 instead of breaking a started 200
    ready: dict[int, bytes] = {}
    ahead = 0
    for i, (row, target) in enumerate(zip(rows, plan)):
        if target is None or request.method == "HEAD":
            continue
        if ahead >= TRANSCODE_AHEAD:
            break
        ready[i] = await _transcoded(found, row, target)
        ahead += int(row.get("size") or 0)
    out = MultipartWriter(request, negotiate.DICOM)
    await out.start()
    try:
        for i, (row, target) in enumerate(zip(rows, plan)):
            await out.write(out.head(media_with_ts(negotiate.DICOM, target or row["transfer_syntax"])))
            if target is None:
                async for chunk in found.chunks(row):
                    await out.write(chunk)
            else:
                await out.write(ready.pop(i, None) or await _transcoded(found, row, target))
            await out.write(b"\r\n")
    except (GatewayError, OSError) as exc:  # past the status line: end the connection, never a 500 inside a 200
        return out.cut_short(exc)
    return await out.end()


async def _transcoded(found: Retrieval, row: dict, target: str) -> bytes:
    """One instance transcoded (worker thread); an instance that cannot be → 406 with the reason."""
    try:
        return await found.transcode(row, target)
    except pixels.PixelError as exc:
        raise NotAcceptable(f"instance {row['sop_uid']} cannot be sent as {target}: {exc}") from None
    except Exception as exc:  # a stored file pydicom cannot re-encode
        log.warning("transcode failed", extra={"error_type": type(exc).__name__})
        raise NotAcceptable(f"instance {row['sop_uid']} cannot be sent as {target} (ask for "
                            "transfer-syntax=* to get it as stored)") from None


async def _retrieve_as_stored(request: web.Request, found: Retrieval) -> web.StreamResponse:
    """Instances sent as stored, framed by multipart heads built up front, with an exact Content-Length:
    the files go out in one pass with sendfile (:meth:`Retrieval.stream`)."""
    out = MultipartWriter(request, negotiate.DICOM)
    heads = [out.head(media_with_ts(negotiate.DICOM, r["transfer_syntax"])) for r in found.rows]
    # sizes first (for Content-Length; a missing file is an error before the status line), files opened
    # one at a time while sending (a study may hold thousands of instances)
    sizes = found.sizes()
    # (a StreamResponse sends its status line and headers at prepare: the body written to the socket after
    # them cannot overtake them — test_wado_series_stream reads the answer from the raw socket)
    await out.start(sum(map(len, heads)) + sum(sizes) + 2 * len(heads) + len(out.tail))
    try:
        await found.stream(request.transport, heads, sizes, out.tail)
    except OSError as exc:  # past the status line: end the connection, never a 500 inside a 200
        return out.cut_short(exc)
    await out.response.write_eof()
    return out.response


async def retrieve(request: web.Request) -> web.StreamResponse:
    return await _retrieve(request)


async def metadata(request: web.Request) -> web.Response:
    """WADO-RS Retrieve Metadata (PS3.18 §10.4.1.1.2), every level: application/dicom+json."""
    Accept.of(request).json()
    deid = _deid_keys(request)
    found = await _visible(request, _svc(request), metadata=True, deid=deid)
    if deid is not None:
        out = await asyncio.to_thread(_deidentified_metadata, found.rows, deid)
        return web.Response(body=orjson.dumps(out), content_type=DICOM_JSON)
    service = urls(request)
    out = []
    for r in found:
        meta = orjson.loads(r["metadata"]) if r["metadata"] else {}
        out.append(attrs.resolve_bulk(meta, service.bulk_of(r)))
    return web.Response(body=orjson.dumps(out), content_type=DICOM_JSON)


def _frame_numbers(text: str) -> list[int]:
    try:
        nums = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadRequest(f"frame list {text!r} must be comma-separated integers") from None
    if not nums or min(nums) < 1:
        raise BadRequest("frame numbers start at 1")
    return nums


async def frames(request: web.Request) -> web.StreamResponse:
    """WADO-RS Retrieve Frames (PS3.18 §10.4.1.1.3), negotiated per §8.7: multipart/related (or, for one frame,
    single part) of application/octet-stream (uncompressed; compressed frames are decoded), the stored
    compressed form (image/jpeg, image/jls, image/jp2, image/dicom-rle with its transfer syntax, or
    ``transfer-syntax=*``), or frames encoded here (JPEG baseline from 8-bit pixels, RLE, JPEG 2000 lossless).
    406 when no accepted representation can be produced."""
    wants = Accept.of(request).frames()
    nums = _frame_numbers(request.match_info["frames"])
    found = await _visible(request, _svc(request), metadata=False, deid=_deid_keys(request))
    [row] = found.rows
    try:
        want, media, ts, data = await found.frames(row, nums, wants)
    except pixels.PixelError as exc:
        raise _pixel_error(exc) from None
    except Exception as exc:  # a stored file whose pixel data pydicom cannot read: 406
        log.warning("frames failed", extra={"error_type": type(exc).__name__})
        raise NotAcceptable("the instance's pixel data cannot be split into frames") from None
    return await send_parts(request, media, ts, data, want.multipart)


def _pixel_error(exc: "pixels.PixelError"):
    if exc.kind == "range":
        return NotFound(str(exc))
    if exc.kind == "unsupported":
        return NotAcceptable(str(exc))
    return BadRequest(str(exc))


def _render_params(request: web.Request) -> tuple[str, dict]:
    fmt = Accept.of(request).rendered()
    opts: dict = {}
    q = request.query
    for name in q:
        if name not in ("window", "viewport", "quality"):
            raise BadRequest(f"rendered parameter {name!r} is not supported (window, viewport, quality)")
    if "window" in q:
        try:
            c, w, *fn = q["window"].split(",")
            opts["window"] = (float(c), float(w), (fn[0] if fn else "linear").lower())
        except ValueError:
            raise BadRequest("window must be center,width[,function]") from None
        if opts["window"][1] <= 0 or opts["window"][2] not in ("linear", "linear_exact", "sigmoid"):
            raise BadRequest("window width must be > 0 and function linear, linear_exact or sigmoid")
    if "viewport" in q:
        try:
            vw, vh = (int(x) for x in q["viewport"].split(",")[:2])
        except ValueError:
            raise BadRequest("viewport must be width,height") from None
        if not (0 < vw <= 4096 and 0 < vh <= 4096):
            raise BadRequest("viewport dimensions must be 1..4096")
        opts["viewport"] = (vw, vh)
    if "quality" in q:
        try:
            opts["quality"] = max(1, min(100, int(q["quality"])))
        except ValueError:
            raise BadRequest("quality must be an integer 1..100") from None
    return fmt, opts


async def _render(request: web.Request, *, thumbnail: bool) -> web.Response:
    fmt, opts = _render_params(request)
    if thumbnail:
        opts.setdefault("viewport", (128, 128))
    m = request.match_info
    found = await _visible(request, _svc(request), metadata=False, deid=_deid_keys(request))
    images = [r for r in found if r.get("rows")]
    if not images:
        raise NotFound("no image instance to render")
    row = images[len(images) // 2] if not m.get("instance") else images[0]
    frame = _frame_numbers(m["frames"])[0] if "frames" in m else 1
    try:
        body = await found.render(row, frame, fmt, opts)
    except pixels.PixelError as exc:
        raise _pixel_error(exc) from None
    return web.Response(body=body, content_type=fmt)


async def rendered(request: web.Request) -> web.Response:
    """WADO-RS Retrieve Rendered (PS3.18 §10.4.1.1.4 / §8.3.5): image/jpeg or image/png; window, viewport."""
    return await _render(request, thumbnail=False)


async def thumbnail(request: web.Request) -> web.Response:
    """WADO-RS Retrieve Thumbnail (PS3.18 §10.4.1.1.5): a small rendered image (default 128×128)."""
    return await _render(request, thumbnail=True)


async def bulkdata(request: web.Request) -> web.StreamResponse:
    """WADO-RS Retrieve Bulkdata (PS3.18 §10.4.1.1.6): the value of one bulk attribute."""
    want = Accept.of(request).bulkdata()
    m = request.match_info
    deid = _deid_keys(request)
    if deid is not None and m["tag"].upper() not in _DEID_BULK_TAGS:
        raise NotFound(f"bulk data {m['tag']} is not part of a de-identified instance")
    found = await _visible(request, _svc(request), metadata=False, deid=deid)
    [row] = found.rows
    try:
        data = await found.bulk_value(row, m["tag"])
    except pixels.PixelError as exc:
        raise _pixel_error(exc) from None
    return await send_parts(request, negotiate.OCTET, None, [data], want.multipart)


def setup_routes(app: web.Application) -> None:
    r = app.router
    st, se, i = "/dicomweb/studies/{study}", "/series/{series}", "/instances/{instance}"
    r.add_post("/dicomweb/studies", stow, name="dicomweb.stow")
    r.add_post(st, stow, name="dicomweb.stow_study")
    r.add_get("/dicomweb/studies", search_studies, name="dicomweb.search_studies")
    r.add_get("/dicomweb/series", search_series, name="dicomweb.search_series")
    r.add_get("/dicomweb/instances", search_instances, name="dicomweb.search_instances")
    r.add_get(st + "/series", search_series, name="dicomweb.search_study_series")
    r.add_get(st + "/instances", search_instances, name="dicomweb.search_study_instances")
    r.add_get(st + se + "/instances", search_instances, name="dicomweb.search_series_instances")
    r.add_get(st, retrieve, name="dicomweb.retrieve_study")
    r.add_get(st + se, retrieve, name="dicomweb.retrieve_series")
    r.add_get(st + se + i, retrieve, name="dicomweb.retrieve_instance")
    r.add_get(st + "/metadata", metadata, name="dicomweb.metadata_study")
    r.add_get(st + se + "/metadata", metadata, name="dicomweb.metadata_series")
    r.add_get(st + se + i + "/metadata", metadata, name="dicomweb.metadata_instance")
    r.add_get(st + se + i + "/frames/{frames}", frames, name="dicomweb.frames")
    r.add_get(st + "/rendered", rendered, name="dicomweb.rendered_study")
    r.add_get(st + se + "/rendered", rendered, name="dicomweb.rendered_series")
    r.add_get(st + se + i + "/rendered", rendered, name="dicomweb.rendered_instance")
    r.add_get(st + se + i + "/frames/{frames}/rendered", rendered, name="dicomweb.rendered_frames")
    r.add_get(st + "/thumbnail", thumbnail, name="dicomweb.thumbnail_study")
    r.add_get(st + se + "/thumbnail", thumbnail, name="dicomweb.thumbnail_series")
    r.add_get(st + se + i + "/thumbnail", thumbnail, name="dicomweb.thumbnail_instance")
    r.add_get(st + se + i + "/bulkdata/{tag}", bulkdata, name="dicomweb.bulkdata")


__all__ = ["setup_routes"]
