"""DICOMweb query and retrieve (DICOM PS3.18 §10.6 QIDO-RS, §10.4 WADO-RS; DIMSE C-FIND / C-MOVE / C-GET
and the imaging export use the same calls): every read through the access layer (the requester's
:class:`~gateway.store.access.Access`), audited; a retrieve returns a :class:`Retrieval` — the visible
instances' index rows and the one way to read their stored bytes (files, frames, rendered images, bulk
data, de-identified copies), so no caller opens a blob file itself."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import AsyncIterator, Iterator

from pydicom import dcmread

from gateway.context import Requester
from gateway.errors import NotFound
from gateway.store import dicom_reads
from gateway.store.access import AccessLayer
from gateway.store.blobs import BlobStore
from mappings.dicom import pixels
from mappings.dicom.qido import QidoQuery

#: bytes of a stored file read at once when it is streamed through the event loop
CHUNK = 256 * 1024


class Retrieval:
    """The instances one WADO-RS (or C-MOVE / C-GET / export) request may read, in series, instance number
    and SOP Instance UID order, and their stored bytes. Blocking work runs in threads unless a method
    says otherwise."""

    __slots__ = ("rows", "_blobs")

    def __init__(self, rows: list[dict], blobs: BlobStore) -> None:
        self.rows = rows
        self._blobs = blobs

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def only(self, rows: list[dict]) -> "Retrieval":
        """The same retrieval narrowed to ``rows`` (a subset of its own)."""
        return Retrieval(rows, self._blobs)

    def _path(self, row: dict) -> Path:
        return self._blobs.path(row["blob_path"])

    async def read(self, row: dict) -> bytes:
        """The stored PS3.10 file."""
        return await asyncio.to_thread(self._path(row).read_bytes)

    async def transcode(self, row: dict, ts: str) -> bytes:
        """The instance re-encoded in transfer syntax ``ts`` (raises :class:`pixels.PixelError` or what the
        DICOM reader raises for a file it cannot re-encode)."""
        return await asyncio.to_thread(pixels.transcode, self._path(row), ts)

    async def frames(self, row: dict, numbers: list[int], wants) -> tuple:
        """Frames as the first producible want: (want, media, transfer syntax, [bytes]) (pixels.frames_as)."""
        return await asyncio.to_thread(pixels.frames_as, self._path(row), numbers, wants)

    async def render(self, row: dict, frame: int, fmt: str, opts: dict) -> bytes:
        return await asyncio.to_thread(pixels.render, self._path(row), frame, fmt, opts)

    async def bulk_value(self, row: dict, tag: str) -> bytes:
        return await asyncio.to_thread(pixels.bulk_value, self._path(row), tag)

    async def deidentified(self, row: dict, keys, options=None):
        """The instance de-identified by the site's profile: its bytes, or a ``Withheld``."""
        from gateway.services.deid import deidentify_file

        return await asyncio.to_thread(deidentify_file, self._path(row), keys, row.get("patient_id"), options)

    def dataset(self, row: dict):
        """The stored instance as a pydicom Dataset (blocking: for a caller on a thread of its own)."""
        return dcmread(self._path(row))

    def sizes(self) -> list[int]:
        """Each stored file's size (a stat per file, on the calling thread)."""
        return [os.stat(self._blobs.file(r["blob_path"])).st_size for r in self.rows]

    async def stream(self, transport, heads: list[bytes], sizes: list[int], tail: bytes) -> None:
        """Every stored file, each after its multipart head (and the CRLF that closes the part before), then
        ``tail``: the body of a multipart answer whose status line and headers are sent. Written straight to
        the connection's socket, as ``loop.sendfile`` does for one file but for all of them in one pass: each
        head with MSG_MORE (it leaves in one segment with its file's first bytes, not as a segment of its
        own), each file with ``os.sendfile`` (zero-copy), the next file opened and its pages asked for
        (POSIX_FADV_WILLNEED: read-ahead from disk while this one is sent); the socket is waited for only
        when it is full, and the event loop gets a turn after each file. A file whose size is not the one
        given (stored files never change) or a lost connection raises OSError (ConnectionResetError) — the
        caller cuts the answer short. A transport without a plain socket (TLS) gets :meth:`sendfile` per
        file (asyncio's fallback)."""
        sock = transport.get_extra_info("socket") if transport is not None else None
        if (sock is None or transport.get_extra_info("ssl_object") is not None or transport.is_closing()
                or transport.get_write_buffer_size() or not hasattr(os, "sendfile")):
            await self._stream_through(transport, heads, sizes, tail)
            return
        loop = asyncio.get_running_loop()
        # a descriptor of our own for the same socket: the transport keeps its own (and its reader)
        out = socket.socket(fileno=os.dup(sock.fileno()))
        rows, n = self.rows, len(self.rows)
        nxt: int | None = None
        try:
            out.setblocking(False)
            fd = out.fileno()
            nxt = self._open(rows[0], sizes[0]) if n else None
            lead = b""
            for i in range(n):
                cur, nxt = nxt, None
                try:
                    if i + 1 < n:
                        nxt = self._open(rows[i + 1], sizes[i + 1])
                    await _send(loop, out, lead + heads[i], socket.MSG_MORE)
                    await _sendfile(loop, fd, cur, sizes[i])
                finally:
                    os.close(cur)
                lead = b"\r\n"
                await asyncio.sleep(0)
            await _send(loop, out, lead + tail, 0)
        finally:
            if nxt is not None:
                os.close(nxt)
            out.close()

    def _open(self, row: dict, size: int) -> int:
        """A stored file opened for sending, its pages asked for ahead; ConnectionResetError when its size
        is not ``size`` any more."""
        fd = os.open(self._blobs.file(row["blob_path"]), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != size:
                raise ConnectionResetError("instance file changed while sending")
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _stream_through(self, transport, heads: list[bytes], sizes: list[int], tail: bytes) -> None:
        """:meth:`stream` through the transport: ``loop.sendfile`` per file (it waits for the transport's
        buffer to drain, and reads and writes where it cannot send a file itself)."""
        lead = b""
        for head, row, size in zip(heads, self.rows, sizes):
            if transport is None or transport.is_closing():
                raise ConnectionResetError("connection lost while sending")
            transport.write(lead + head)
            await self.sendfile(transport, row, size)
            lead = b"\r\n"
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost while sending")
        transport.write(lead + tail)

    async def sendfile(self, transport, row: dict, size: int) -> None:
        """Send the stored file on ``transport`` (``loop.sendfile``: zero-copy where the transport allows);
        a file whose size is not ``size`` any more (stored files never change) or a lost connection raises
        ConnectionResetError before anything of it is sent."""
        with open(self._path(row), "rb") as f:
            if os.fstat(f.fileno()).st_size != size or transport is None:
                raise ConnectionResetError("instance file changed or connection lost while sending")
            await asyncio.get_running_loop().sendfile(transport, f, 0, size)

    async def chunks(self, row: dict) -> AsyncIterator[bytes]:
        """The stored file in :data:`CHUNK`-sized pieces."""
        with open(self._path(row), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until the socket ``fd`` can take more bytes (or has failed: the next send says how)."""
    fut = loop.create_future()
    loop.add_writer(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes, flags: int) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, flags):]
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock.fileno())


async def _sendfile(loop: asyncio.AbstractEventLoop, fd: int, file: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            sent = os.sendfile(fd, file, offset, size - offset)
        except (BlockingIOError, InterruptedError):
            await _writable(loop, fd)
            continue
        if not sent:
            raise ConnectionResetError("instance file shorter than its size")
        offset += sent


class DicomRetrieve:
    """QIDO-RS search and WADO-RS instance look-up through the access layer."""

    def __init__(self, access: AccessLayer, blobs: BlobStore) -> None:
        self.access = access
        self.blobs = blobs

    async def search(self, requester: Requester, level: str, q: QidoQuery, warnings: list[str] | None = None,
                     patients: list | None = None, *, releasable_only: bool = False) -> tuple[list[dict], int]:
        """QIDO-RS: (rendered DICOM JSON results, total before paging). A research scope's answer is built
        from permitted instances only; an admin gets the conflicting studies (instances of several
        patients) among the results in ``warnings``.  ``patients``, if given, receives each result's
        common-model patient (a de-identified answer's date offset).  ``releasable_only``: a de-identified
        answer, which neither shows nor counts what the profile withholds (burned-in annotation)."""
        access = await self.access.open(requester)
        total, results, conflicts = await dicom_reads.qido(
            access, level, q, report_conflicts=warnings is not None and requester.is_admin,
            releasable_only=releasable_only)
        if warnings is not None:
            warnings += [f"study {u} holds instances of several patients (conflict: see fedgate dicom conflicts)"
                         for u in conflicts]
        await access.record("E", f"qido-{level}", "0", patients={r.get("patient_id") for r in results})
        if patients is not None:
            patients += [r.get("patient_id") for r in results]
        return [q.render(level, r) for r in results], total

    async def stored_study_uids(self) -> list[str]:
        """Every stored Study Instance UID: a translation table for de-identified UIDs, not an answer
        (the gated read that follows decides what a requester gets)."""
        return await dicom_reads.stored_study_uids(self.access.db)

    async def retrieve(self, requester: Requester, study: str, series: str | None = None,
                       sop: str | None = None, *, metadata: bool = True) -> Retrieval:
        """The visible instances of a study / series / instance (404 when none is visible), audited;
        ``metadata=False`` leaves out the stored DICOM JSON for routes that only need the files."""
        access = await self.access.open(requester)
        rows = await dicom_reads.instances(access, study, series, sop, metadata=metadata)
        if not rows:
            what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
            raise NotFound(f"{what} not found")
        await access.record("R", "wado", "0", resources=[f"ImagingStudy/{study}"],
                            patients={r["patient_id"] for r in rows})
        return Retrieval(rows, self.blobs)

    async def retrieve_studies(self, requester: Requester, studies, *, metadata: bool = False) -> Retrieval:
        """The visible instances of several studies, in study UID order (a study with none visible is left
        out, as one that does not exist); each study audited as its own retrieve."""
        rows: list[dict] = []
        for study in sorted(studies):
            try:
                rows += (await self.retrieve(requester, study, metadata=metadata)).rows
            except NotFound:
                continue
        return Retrieval(rows, self.blobs)


__all__ = ["CHUNK", "DicomRetrieve", "Retrieval"]
