"""DICOMweb routes under /dicomweb (DICOM PS3.18): STOW-RS, QIDO-RS, WADO-RS.

HTTP concerns only — media types, multipart framing, Accept negotiation; the work is in
``gateway/services/dicomweb.py``.  Errors outside a STOW response payload are RFC 9457 problem details
(the default renderer) with the PS3.18 status code.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from aiohttp import web

from gateway import keys
from gateway.edge import FORWARDED, PREFIX
from gateway.errors import BadRequest, GatewayError, NotAcceptable, NotFound, PayloadTooLarge, UnsupportedMediaType
from gateway.middlewares import requester_of
from gateway.services.dicomweb import (HEADER_READ, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, DicomwebService, Part,
                                       check_study_uid)
from mappings.dicom import attributes as attrs
from mappings.dicom import negotiate
from mappings.dicom import pixels
from mappings.dicom.qido import QidoError, QidoQuery

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UNCOMPRESSED = set(pixels.UNCOMPRESSED)  # explicit/implicit VR little endian, big endian, deflate
#: stored bytes of the instances transcoded before a WADO response starts (see _retrieve)
TRANSCODE_AHEAD = 64 * 1024 * 1024
CHUNK = 256 * 1024
#: bytes of a STOW part collected before a thread writes them (see _PartWriter)
WRITE_BATCH = 1024 * 1024
#: threads writing and fsync-ing STOW part files: an fsync waits on the disk for milliseconds, so they get threads of their own rather than queueing the
#: next parts' writes (and every other ``to_thread`` user) behind the default executor's cpu + 4
WRITER_THREADS = 16
_writers: ThreadPoolExecutor | None = None


def _writer_pool() -> ThreadPoolExecutor:
    global _writers
    if _writers is None:
        _writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="stow-write")
    return _writers

def _svc(request: web.Request) -> DicomwebService:
    return request.app[keys.DICOMWEB]


def base_url(request: web.Request) -> str:
    configured = request.app[keys.SETTINGS].base_url
    if configured:
        return configured.rstrip("/") + "/dicomweb"
    host = request.host
    if ":" not in host.rsplit("]", 1)[-1] and request.transport is not None and not request.get(FORWARDED):
        # some clients (dicomweb-client) send Host without the port: use the port we were reached on
        sock = request.transport.get_extra_info("sockname")
        if sock and sock[1] not in (80, 443):
            host = f"{host}:{sock[1]}"
    return f"{request.scheme}://{host}{request.get(PREFIX, '')}/dicomweb"


# ------------------------------------------------------------------------------------------- STOW-RS


MAX_PART_HEADERS = 16 * 1024


def _stow_media(request: web.Request) -> bytes:
    """Check the STOW media type; returns the multipart boundary."""
    ctype = request.headers.get("Content-Type", "")
    main = ctype.split(";")[0].strip().lower()
    if main != "multipart/related":
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related; type=\"application/dicom\", not {main or 'nothing'!r}")
    params = {k.strip().lower(): v.strip().strip('"') for k, _, v in
              (p.partition("=") for p in ctype.split(";")[1:]) if k.strip()}
    if "boundary" not in params or not params["boundary"]:
        raise BadRequest("multipart/related request without a boundary parameter")
    if params.get("type", "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(f"type={params['type']!r} is not supported; send application/dicom parts")
    # RFC 2046 caps boundaries at 70 characters; Orthanc's DICOMweb client sends 73. Be liberal in what we
    # accept (up to 200) rather than refuse a real PACS.
    if len(params["boundary"]) > 200:
        raise BadRequest(f"malformed multipart body: boundary of {len(params['boundary'])} characters is too long")
    try:
        return params["boundary"].encode("ascii")
    except UnicodeEncodeError:
        raise BadRequest("malformed multipart body: the boundary is not ASCII") from None


class _MultipartStream:
    """Streaming multipart/related splitter (RFC 2046 §5.1.1): takes the body in large blocks and finds the
    delimiters with ``bytearray.find`` (aiohttp's part reader copied every block twice on the way)."""

    def __init__(self, content, boundary: bytes) -> None:
        self.content = content
        self.delim = b"\r\n--" + boundary
        self.buf = bytearray(b"\r\n")  # the first delimiter may open the body without a CRLF

    async def _more(self) -> bool:
        chunk = await self.content.readany()  # a received block as is (read(n) joins blocks: a copy)
        if not chunk:
            return False
        self.buf += chunk
        return True

    async def next_part(self) -> bytes | None:
        """Skip to the next part; returns its header block, or None at the closing delimiter."""
        buf, delim = self.buf, self.delim
        while (i := buf.find(delim)) < 0:  # the preamble (first part) or the rest of a skipped part
            del buf[:max(0, len(buf) - len(delim) + 1)]
            if not await self._more():
                raise BadRequest("malformed multipart body: no boundary delimiter found")
        del buf[:i + len(delim)]
        while len(buf) < 2:
            if not await self._more():
                raise BadRequest("malformed multipart body: it ends after a boundary delimiter")
        if buf[:2] == b"--":
            return None
        while (j := buf.find(b"\r\n")) < 0:
            if len(buf) > 1024 or not await self._more():
                raise BadRequest("malformed multipart body: a boundary line does not end")
        if buf[:j].strip(b" \t"):
            raise BadRequest("malformed multipart body: text after a boundary delimiter")
        del buf[:j + 2]
        while True:
            if buf[:2] == b"\r\n":  # no part headers
                del buf[:2]
                return b""
            if (k := buf.find(b"\r\n\r\n")) >= 0:
                break
            if len(buf) > MAX_PART_HEADERS or not await self._more():
                raise BadRequest("malformed multipart body: part headers do not end")
        headers = bytes(buf[:k])
        del buf[:k + 4]
        return headers

    async def body(self, sink, drain=None) -> None:
        """Hand the current part's bytes to ``sink(data)``, up to (not including) the next delimiter.
        ``data`` is bytes, a memoryview of an immutable ``bytes`` block (the sink may keep either), or a
        memoryview of the splitter's own buffer (valid only during the call: copy it to keep it).
        ``await drain()``, if given, runs before each further block is read (the sink's back-pressure)."""
        buf, delim = self.buf, self.delim
        keep = len(delim) - 1  # a delimiter may straddle two blocks
        while (i := buf.find(delim)) < 0:
            if len(buf) > keep:
                with memoryview(buf) as view, view[:len(buf) - keep] as head:
                    sink(head)
                del buf[:len(buf) - keep]
            if drain is not None:
                await drain()
            chunk = await self.content.readany()
            if not chunk:
                raise BadRequest("malformed multipart body: it ends inside a part (no closing boundary)")
            # the common case, a block without a delimiter (none straddling from the kept tail either):
            # written straight from the received block, only its last few bytes kept (was: two copies)
            if len(chunk) > 2 * len(delim) and chunk.find(delim) < 0 and (bytes(buf) + chunk[:keep]).find(delim) < 0:
                if buf:
                    sink(bytes(buf))
                sink(memoryview(chunk)[:len(chunk) - keep])  # a view of the (immutable) block: no copy
                buf[:] = chunk[len(chunk) - keep:]
                continue
            buf += chunk
        if i:
            with memoryview(buf) as view, view[:i] as head:
                sink(head)
            del buf[:i]  # next_part() consumes the delimiter


class _PartWriter:
    """Writes one part's temp file off the event loop: the received blocks are kept (no copy where they are
    immutable) and handed to a thread about every :data:`WRITE_BATCH` bytes, so the event loop only splits
    the body while the file creation and the copies to the disk run beside it. The last hand-over writes the
    rest, tells the loop the file is complete, then ``fsync``-s and closes it in the same thread job (blob
    store step 3, one hand-over per part instead of a write on the loop plus a separate fsync job); the
    receiving loop does not wait for it. At most two batches per part are held in memory.

    ``direct``: the file is written with ``O_DIRECT`` where its file system allows it (see
    :class:`_PartFile`), else through the page cache."""

    def __init__(self, path: Path, direct: bool = True) -> None:
        self.file = _PartFile(path, direct)
        self.chunks: list = []
        self.pending = 0
        self.job: asyncio.Future | None = None  # the batch being written
        self.owned = False  # the final job closes the fd

    def feed(self, data) -> None:
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and isinstance(data.obj, bytes)):
            data = bytes(data)  # a view of the splitter's buffer, which changes after the call
        self.chunks.append(data)
        self.pending += len(data)

    async def _settle(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            await job  # back-pressure: one batch in the thread, one being collected

    async def drain(self) -> None:
        if self.pending >= WRITE_BATCH:
            await self._settle()
            chunks, self.chunks, self.pending = self.chunks, [], 0
            self.job = asyncio.get_running_loop().run_in_executor(_writer_pool(), self.file.write, chunks)

    async def finish(self) -> tuple[asyncio.Future, asyncio.Future]:
        """Hand the rest to a thread; returns (a future done when the file is complete — with the write's
        OSError, if any —, a future of its fsync: OSError or None) without waiting for either, so the next
        part is received while this one is written."""
        await self._settle()
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        chunks, self.chunks, self.pending = self.chunks, [], 0
        self.owned = True
        synced = loop.run_in_executor(_writer_pool(), self.file.finish, chunks, loop, written)
        return written, synced

    def abort(self) -> None:
        """Close the fd and remove the file (once an in-flight batch is done: a thread may be writing to it,
        or be about to create it)."""
        if self.owned:
            return
        self.owned = True
        if self.job is not None:
            self.job.add_done_callback(lambda _job: self.file.discard())
        else:
            self.file.discard()


#: O_DIRECT alignment of buffer address, file offset and length (the largest logical block size in use)
DIRECT_ALIGN = 4096
#: each writer thread's staging buffer for O_DIRECT writes (page-aligned: an anonymous mmap)
_STAGE_BYTES = WRITE_BATCH + CHUNK
_stage = threading.local()


class _PartFile:
    """A part's temp file as written by writer-thread jobs, one job at a time (:class:`_PartWriter`).

    With ``direct`` the file is switched to ``O_DIRECT`` once created: the bytes go from the thread's
    page-aligned staging buffer to the disk without a copy into the page cache. The page-cache copy was
    the largest single CPU cost of STOW on the bench VM (new page-cache pages are slow to touch in a VM),
    and a PACS ingest does not read most of what it stores soon after. Each job writes whole 4 KiB blocks
    and keeps the rest (< 4 KiB) for the next; the last job writes it through the page cache. A file
    system without O_DIRECT (tmpfs, some network file systems: EINVAL), or a direct write it refuses,
    gets the rest of the file written through the page cache, as before."""

    __slots__ = ("path", "direct", "fd", "tail")

    def __init__(self, path: Path, direct: bool) -> None:
        self.path = path
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd: int | None = None  # opened (O_EXCL) by the first job
        self.tail = b""  # bytes a direct write left for the next job (not a whole block)

    def write(self, chunks: list) -> None:
        """Thread job: create the file (first job) and write ``chunks`` (closed on an error)."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            if self.direct:
                try:
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
                except OSError:
                    self.direct = False
        try:
            if self.direct:
                self._write_direct(chunks)
            else:
                for c in chunks:
                    self._write_all(c)
        except BaseException:
            self.close()
            raise

    def finish(self, chunks: list, loop: asyncio.AbstractEventLoop, written: asyncio.Future) -> OSError | None:
        """Thread job: the last chunks (and the tail), then — the loop told the file is complete, so parsing
        can start — fsync and close."""
        def tell(exc: BaseException | None) -> None:
            if not written.done():
                written.set_result(None) if exc is None else written.set_exception(exc)

        try:
            self.write(chunks)
            if self.tail:
                self._buffered()
                self._write_all(self.tail)
                self.tail = b""
        except BaseException as exc:
            self.close()
            loop.call_soon_threadsafe(tell, exc)
            return None
        loop.call_soon_threadsafe(tell, None)
        try:
            os.fsync(self.fd)
        except OSError as exc:
            return exc
        finally:
            self.close()
        return None

    def _write_direct(self, chunks: list) -> None:
        buf = getattr(_stage, "buf", None)
        if buf is None:
            buf = _stage.buf = mmap.mmap(-1, _STAGE_BYTES)
        pos = 0
        for c in ([self.tail, *chunks] if self.tail else chunks):
            with memoryview(c) as view:
                off, end = 0, len(view)
                while off < end:
                    n = min(end - off, _STAGE_BYTES - pos)
                    buf[pos:pos + n] = view[off:off + n]
                    pos += n
                    off += n
                    if pos == _STAGE_BYTES:
                        self._write_all(memoryview(buf))
                        pos = 0
        whole = pos - pos % DIRECT_ALIGN
        if whole:
            self._write_all(memoryview(buf)[:whole])
        self.tail = buf[whole:pos]

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # a direct write refused: this and the rest through the page cache
                continue
            view = view[n:]
            if view and self.direct:
                self._buffered()  # a short direct write leaves an unaligned offset

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _part_type(headers: bytes) -> str:
    for line in headers.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return "application/dicom"


async def _receive(request: web.Request, boundary: bytes, on_part=None) -> list[Part]:
    """Stream every body part to a temp file (PS3.18 §8.6.1.2); memory does not grow with the body.
    ``on_part(part[, written, synced])`` is called as each part is complete (the service parses it once
    ``written`` is done); ``written`` / ``synced``: futures of its file's write and fsync (see
    :meth:`_PartWriter.finish`), not given for a part rejected while streaming."""
    settings = request.app[keys.SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_stow_bytes:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds {settings.max_stow_bytes}")
    svc = _svc(request)
    stream = _MultipartStream(request.content, boundary)
    parts: list[Part] = []
    finals: list[tuple[asyncio.Future, asyncio.Future]] = []  # each written part's (written, synced)
    total = 0

    def count(n: int) -> None:
        nonlocal total
        total += n
        if total > settings.max_stow_bytes:
            raise PayloadTooLarge(f"request body exceeds {settings.max_stow_bytes} bytes")

    try:
        while (headers := await stream.next_part()) is not None:
            ptype = _part_type(headers)
            if ptype.startswith("multipart/"):
                raise BadRequest("nested multipart bodies are not supported")
            if ptype != "application/dicom":
                await stream.body(lambda data: count(len(data)))
                parts.append(Part(None, failure=CANNOT_UNDERSTAND, reason=f"part media type {ptype!r} is not "
                                  "application/dicom"))
                if on_part is not None:
                    on_part(parts[-1])
                continue
            part = Part(svc.blobs.temp_path(), 0)
            parts.append(part)
            writer = _PartWriter(part.tmp, settings.stow_direct_io)
            head = bytearray()  # its first bytes: parsed as soon as the part has arrived (see ParseFeed)

            def sink(data, writer: _PartWriter = writer, part: Part = part, head: bytearray = head) -> None:
                count(len(data))
                if len(head) < HEADER_READ:
                    head += data[:HEADER_READ - len(head)]
                part.size += len(data)
                if part.size > settings.max_instance_bytes:
                    return  # drain the part, keep nothing
                writer.feed(data)

            done = None
            try:
                await stream.body(sink, writer.drain)
                if part.size <= settings.max_instance_bytes:
                    done = await writer.finish()
            finally:
                if done is None:
                    writer.abort()
            if done is not None:
                part.head = bytes(head)
            if part.size > settings.max_instance_bytes:
                part.tmp.unlink(missing_ok=True)
                parts[-1] = Part(None, failure=OUT_OF_RESOURCES,
                                 reason=f"instance larger than {settings.max_instance_bytes} bytes")
            if done is not None:
                finals.append(done)
            if on_part is not None:
                on_part(parts[-1], *(done or ()))
    except BaseException:
        for _written, synced in finals:  # a part's file is created by its writer thread: remove it after
            if not synced.done():
                synced.add_done_callback(lambda _f: _cleanup(parts))
        _cleanup(parts)
        raise
    if not parts:
        raise BadRequest("the multipart body holds no parts")
    return parts


def _cleanup(parts: list[Part]) -> None:
    for p in parts:
        if p.tmp is not None:
            try:
                p.tmp.unlink(missing_ok=True)
            except OSError:  # a store gone read-only: the start-up reconcile removes it
                pass


async def stow(request: web.Request) -> web.Response:
    """STOW-RS Store Instances (PS3.18 §10.5): per-instance outcome, 200 / 202 / 409 (§10.5.3)."""
    boundary = _stow_media(request)
    study = request.match_info.get("study")
    if study is not None:
        check_study_uid(study)
    svc = _svc(request)
    feed = svc.parse_feed(study)
    parts = await _receive(request, boundary, feed.add)
    status, body = await svc.store(requester_of(request), parts, study, base_url(request), feed)
    return web.Response(status=status, body=orjson.dumps(body), content_type=DICOM_JSON)


# ------------------------------------------------------------------------------------------- QIDO-RS


def _check_json_accept(request: web.Request) -> None:
    accept = request.headers.get("Accept", "")
    if not accept:
        return
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return
    raise NotAcceptable(f"Accept {accept!r}: this server answers application/dicom+json")


async def _search(request: web.Request, level: str) -> web.Response:
    """QIDO-RS Search (PS3.18 §10.6): application/dicom+json, X-Total-Count = matches before paging."""
    _check_json_accept(request)
    study = request.match_info.get("study")
    series = request.match_info.get("series")
    for uid in (study, series):
        if uid is not None:
            check_study_uid(uid)
    try:
        q = QidoQuery.parse(level, list(request.query.items()), base=base_url(request), study_uid=study,
                            series_uid=series)
    except QidoError as exc:
        raise BadRequest(str(exc), expression=[exc.param]) from None
    notes: list[str] = []  # (admins: conflicting studies among the results)
    results, total = await _svc(request).search(requester_of(request), level, q, notes)
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


def _plan_transfer(rows: list[dict], wants: list[negotiate.Want]) -> list[str | None]:
    """Per instance (PS3.18 §8.7.3.5): None = send as stored, else the transfer syntax to transcode to — the
    first accepted application/dicom representation that can be produced (uncompressed, RLE or JPEG 2000
    lossless; compressed instances are decoded first).  406 if an instance has none."""
    dicom = [w for w in wants if w.media in (negotiate.DICOM, "application/*", "*/*")]
    if not dicom:
        accept = wants[0].media if wants else ""
        raise NotAcceptable(f"Accept {accept!r}: instances are sent as multipart/related; type=\"application/dicom\"")
    plan = []
    for r in rows:
        stored = r["transfer_syntax"]
        for w in dicom:
            ts = w.ts or EXPLICIT_LE
            if ts == "*" or ts == stored:
                plan.append(None)
                break
            if (ts in UNCOMPRESSED or ts in pixels.ENCODABLE) and pixels.can_decode(stored):
                plan.append(ts)
                break
        else:
            raise NotAcceptable(f"instance {r['sop_uid']} is stored as {stored}; it cannot be sent in an accepted "
                                "transfer syntax (ask for transfer-syntax=* to get it as stored)")
    return plan


async def _multipart(request: web.Request, ctype: str) -> tuple[web.StreamResponse, str]:
    boundary = secrets.token_hex(16)
    resp = web.StreamResponse(headers={"Content-Type": f'multipart/related; type="{ctype}"; boundary={boundary}'})
    await resp.prepare(request)
    return resp, boundary


async def _retrieve(request: web.Request) -> web.StreamResponse:
    """WADO-RS Retrieve Study/Series/Instance (PS3.18 §10.4.1): multipart/related application/dicom."""
    svc = _svc(request)
    wants = _wants(request, negotiate.DICOM)
    m = request.match_info
    rows = await svc.instances(requester_of(request), check_study_uid(m["study"]), m.get("series"), m.get("instance"),
                               metadata=False)
    plan = _plan_transfer(rows, wants)
    if len(rows) == 1 and not next(w for w in wants if w.media in (negotiate.DICOM, "application/*", "*/*")).multipart:
        # single part application/dicom (one instance): the file itself
        [row], [target] = rows, plan
        body = (await asyncio.to_thread(Path(svc.blob_path(row)).read_bytes) if target is None
                else await asyncio.to_thread(pixels.transcode, svc.blob_path(row), target))
        return web.Response(body=body, headers={"Content-Type": _media_with_ts(negotiate.DICOM, target or row["transfer_syntax"])})
    if request.method != "HEAD" and all(t is None for t in plan):
        return await _retrieve_as_stored(request, svc, rows)
    # transcoding is decided before the response starts: the instances to transcode (up to TRANSCODE_AHEAD
    # stored bytes) are transcoded first, so one that cannot be answers 406 instead of breaking a started 200
    ready: dict[int, bytes] = {}
    ahead = 0
    for i, (row, target) in enumerate(zip(rows, plan)):
        if target is None or request.method == "HEAD":
            continue
        if ahead >= TRANSCODE_AHEAD:
            break
        ready[i] = await _transcoded(svc, row, target)
        ahead += int(row.get("size") or 0)
    resp, boundary = await _multipart(request, "application/dicom")
    try:
        for i, (row, target) in enumerate(zip(rows, plan)):
            path = svc.blob_path(row)
            ts = target or row["transfer_syntax"]
            await resp.write(f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={ts}\r\n\r\n".encode())
            if target is None:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        await resp.write(chunk)
            else:
                await resp.write(ready.pop(i, None) or await _transcoded(svc, row, target))
            await resp.write(b"\r\n")
    except (GatewayError, OSError) as exc:  # past the status line: end the connection, never a 500 inside a 200
        log.warning("WADO response cut short", extra={"error_type": type(exc).__name__})
        resp.force_close()
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write(f"--{boundary}--\r\n".encode())
    await resp.write_eof()
    return resp


async def _transcoded(svc: DicomwebService, row: dict, target: str) -> bytes:
    """One instance transcoded (worker thread); an instance that cannot be → 406 with the reason."""
    try:
        return await asyncio.to_thread(pixels.transcode, svc.blob_path(row), target)
    except pixels.PixelError as exc:
        raise NotAcceptable(f"instance {row['sop_uid']} cannot be sent as {target}: {exc}") from None
    except Exception as exc:  # a stored file pydicom cannot re-encode
        log.warning("transcode failed", extra={"error_type": type(exc).__name__})
        raise NotAcceptable(f"instance {row['sop_uid']} cannot be sent as {target} (ask for "
                            "transfer-syntax=* to get it as stored)") from None


async def _retrieve_as_stored(request: web.Request, svc: DicomwebService, rows: list[dict]) -> web.StreamResponse:
    """Instances sent as stored: the files go out with ``loop.sendfile`` (zero-copy; asyncio falls back to
    reads where the transport cannot), framed by multipart headers, with an exact Content-Length."""
    boundary = secrets.token_hex(16)
    heads = [f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={r['transfer_syntax']}\r\n\r\n"
             .encode() for r in rows]
    tail = f"--{boundary}--\r\n".encode()
    # sizes first (for Content-Length), files opened one at a time (a study may hold thousands of instances)
    paths = [svc.blob_path(r) for r in rows]
    sizes = [os.stat(p).st_size for p in paths]
    resp = web.StreamResponse(headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    resp.content_length = sum(map(len, heads)) + sum(sizes) + 2 * len(rows) + len(tail)
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    before = b""  # the previous part's closing CRLF goes out with the next part's header (one send, not two)
    for head, path, size in zip(heads, paths, sizes):
        await resp.write(before + head)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size or request.transport is None:  # stored files never change
                raise ConnectionResetError("instance file changed or connection lost while sending")
            await loop.sendfile(request.transport, f, 0, size)
        before = b"\r\n"
    await resp.write(before + tail)
    await resp.write_eof()
    return resp


async def retrieve(request: web.Request) -> web.StreamResponse:
    return await _retrieve(request)


async def metadata(request: web.Request) -> web.Response:
    """WADO-RS Retrieve Metadata (PS3.18 §10.4.1.1.2), every level: application/dicom+json."""
    _check_json_accept(request)
    svc = _svc(request)
    m = request.match_info
    rows = await svc.instances(requester_of(request), check_study_uid(m["study"]), m.get("series"), m.get("instance"))
    base = base_url(request)
    out = []
    for r in rows:
        meta = orjson.loads(r["metadata"]) if r["metadata"] else {}
        out.append(attrs.resolve_bulk(meta, f"{base}/studies/{r['study_uid']}/series/{r['series_uid']}"
                                            f"/instances/{r['sop_uid']}"))
    return web.Response(body=orjson.dumps(out), content_type=DICOM_JSON)


def _frame_numbers(text: str) -> list[int]:
    try:
        nums = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadRequest(f"frame list {text!r} must be comma-separated integers") from None
    if not nums or min(nums) < 1:
        raise BadRequest("frame numbers start at 1")
    return nums


def _wants(request: web.Request, default_part: str) -> list[negotiate.Want]:
    try:
        return negotiate.parse_accept(request.headers.get("Accept"), default_part)
    except negotiate.AcceptError as exc:
        raise BadRequest(str(exc)) from None


def _media_with_ts(media: str, ts: str | None) -> str:
    return f"{media}; transfer-syntax={ts}" if ts else media


async def _send_parts(request: web.Request, media: str, ts: str | None, blobs: list[bytes],
                      multipart: bool) -> web.StreamResponse:
    if not multipart:  # single part (PS3.18 §8.7.3.2): the one frame / value is the body
        [blob] = blobs
        return web.Response(body=blob, headers={"Content-Type": _media_with_ts(media, ts)})
    resp, boundary = await _multipart(request, media)
    for blob in blobs:
        await resp.write(f"--{boundary}\r\nContent-Type: {_media_with_ts(media, ts)}\r\n\r\n".encode())
        await resp.write(blob)
        await resp.write(b"\r\n")
    await resp.write(f"--{boundary}--\r\n".encode())
    await resp.write_eof()
    return resp


async def frames(request: web.Request) -> web.StreamResponse:
    """WADO-RS Retrieve Frames (PS3.18 §10.4.1.1.3), negotiated per §8.7: multipart/related (or, for one frame,
    single part) of application/octet-stream (uncompressed; compressed frames are decoded), the stored
    compressed form (image/jpeg, image/jls, image/jp2, image/dicom-rle with its transfer syntax, or
    ``transfer-syntax=*``), or frames encoded here (JPEG baseline from 8-bit pixels, RLE, JPEG 2000 lossless).
    406 when no accepted representation can be produced."""
    wants = _wants(request, negotiate.OCTET)
    svc = _svc(request)
    m = request.match_info
    nums = _frame_numbers(m["frames"])
    [row] = await svc.instances(requester_of(request), check_study_uid(m["study"]), m["series"], m["instance"],
                                metadata=False)
    try:
        want, media, ts, data = await asyncio.to_thread(pixels.frames_as, svc.blob_path(row), nums, wants)
    except pixels.PixelError as exc:
        raise _pixel_error(exc) from None
    except Exception as exc:  # a stored file whose pixel data pydicom cannot read: 406
        log.warning("frames failed", extra={"error_type": type(exc).__name__})
        raise NotAcceptable("the instance's pixel data cannot be split into frames") from None
    return await _send_parts(request, media, ts, data, want.multipart)


def _pixel_error(exc: "pixels.PixelError"):
    if exc.kind == "range":
        return NotFound(str(exc))
    if exc.kind == "unsupported":
        return NotAcceptable(str(exc))
    return BadRequest(str(exc))


def _render_params(request: web.Request) -> tuple[str, dict]:
    accept = request.headers.get("Accept", "image/jpeg")
    fmt = None
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/jpeg", "image/png"):
            fmt = media
            break
        if media in ("*/*", "image/*"):
            fmt = "image/jpeg"
            break
    if fmt is None:
        raise NotAcceptable(f"Accept {accept!r}: rendered images are image/jpeg or image/png")
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
    svc = _svc(request)
    m = request.match_info
    rows = await svc.instances(requester_of(request), check_study_uid(m["study"]), m.get("series"), m.get("instance"),
                               metadata=False)
    images = [r for r in rows if r.get("rows")]
    if not images:
        raise NotFound("no image instance to render")
    row = images[len(images) // 2] if not m.get("instance") else images[0]
    frame = _frame_numbers(m["frames"])[0] if "frames" in m else 1
    try:
        body = await asyncio.to_thread(pixels.render, svc.blob_path(row), frame, fmt, opts)
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
    wants = _wants(request, negotiate.OCTET)
    for want in wants:  # bulk data is sent as stored: application/octet-stream, multipart or single part
        if want.media in (negotiate.OCTET, "*/*", "application/*") and want.ts in (None, "*", EXPLICIT_LE):
            break
    else:
        raise NotAcceptable(f"Accept {request.headers.get('Accept')!r}: bulk data is sent as application/octet-stream "
                            "(single part, or multipart/related; type=\"application/octet-stream\")")
    svc = _svc(request)
    m = request.match_info
    [row] = await svc.instances(requester_of(request), check_study_uid(m["study"]), m["series"], m["instance"],
                                metadata=False)
    try:
        data = await asyncio.to_thread(pixels.bulk_value, svc.blob_path(row), m["tag"])
    except pixels.PixelError as exc:
        raise _pixel_error(exc) from None
    return await _send_parts(request, negotiate.OCTET, None, [data], want.multipart)


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
