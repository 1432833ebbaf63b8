"""STOW-RS request bodies (DICOM PS3.18 §8.6.1.2, §10.5): the multipart/related media-type check, a
streaming multipart splitter, and each part written to a temp file of the blob store by writer threads
(fsync-ed; O_DIRECT where the file system takes it) while the service parses it."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import threading
from concurrent.futures import Executor
from pathlib import Path

from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.services.dicom_parse import CANNOT_UNDERSTAND, HEADER_READ, OUT_OF_RESOURCES, Part

log = logging.getLogger(__name__)


CHUNK = 256 * 1024
#: bytes of a STOW part collected before a thread writes them (see _PartWriter)
WRITE_BATCH = 1024 * 1024
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

    ``writers``: the threads that write (the ingest service's, :attr:`DicomIngest.writers`; None: the
    loop's default executor). ``direct``: the file is written with ``O_DIRECT`` where its file system allows it (see
    :class:`_PartFile`), else through the page cache."""

    def __init__(self, path: Path, direct: bool = True, writers: Executor | None = None) -> None:
        self.writers = writers
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
            self.job = asyncio.get_running_loop().run_in_executor(self.writers, self.file.write, chunks)

    async def finish(self) -> tuple[asyncio.Future, asyncio.Future]:
        """Hand the rest to a thread; returns (a future done when the file is complete — with the write's
        OSError, if any —, a future of its fsync: OSError or None) without waiting for either, so the next
        part is received while this one is written."""
        await self._settle()
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        chunks, self.chunks, self.pending = self.chunks, [], 0
        self.owned = True
        synced = loop.run_in_executor(self.writers, self.file.finish, chunks, loop, written)
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
    svc = request.app[keys.DICOMWEB]
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
            writer = _PartWriter(part.tmp, settings.stow_direct_io, svc.ingest.writers)
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
