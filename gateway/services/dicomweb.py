"""DICOMweb service (DICOM PS3.18): store (STOW-RS), search (QIDO-RS), retrieve (WADO-RS).

The handlers in ``gateway/handlers/dicomweb.py`` deal with HTTP (multipart, media types); this module
owns what happens to instances: parsing (off the event loop), the blob store protocol of
``gateway/store/blobs.py``, the DICOM index tables, patient matching, the FHIR ImagingStudy sync and
SR/SEG content rows — all in one database transaction per STOW request — and every read through the
consent gate's :class:`~gateway.store.scope.AccessScope`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import orjson
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from gateway.context import Requester
from gateway.errors import BadRequest, NotFound
from gateway.services.access import AccessRecord, AuditSink, Gate, require_write
from gateway.store import fhir_repo as repo
from gateway.store import schema as s
from gateway.store import dicom_views
from gateway.store import qido as qido_sql
from gateway.store.blobs import BlobStore
from gateway.store.db import Database, built_once, table_insert
from gateway.store.dicom_schema import dcm_instance, dcm_seg_segment, dcm_series, dcm_sr_item, dcm_study
from gateway.store.scope import NO_PATIENT, AccessScope, profile_no
from gateway.services.workers import WorkerPool
from mappings.dicom import attributes as attrs
from mappings.dicom import fastjson, rawread
from mappings.dicom.qido import QidoQuery
from mappings.dicom.imagingstudy import imaging_study_resource

log = logging.getLogger(__name__)

# PS3.18 / PS3.4 failure reasons used in FailedSOPSequence (documented in docs/dicomweb.md)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP = 0x0111
OUT_OF_RESOURCES = 0xA700
UID_MISMATCH = 0xA900  # StudyInstanceUID differs from the one in the request URL
CANNOT_UNDERSTAND = 0xC000
WARNING_IDENTICAL = 0xB000  # re-sent identical instance: accepted, nothing changed
#: PostgreSQL advisory lock key (one-key form) serialising STOW index transactions across server processes.
STOW_INDEX_LOCK = 0x570317

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Part:
    """One received body part, already streamed to a temp file (or rejected while streaming)."""

    tmp: Path | None
    size: int = 0
    failure: int | None = None
    reason: str = ""
    #: its first :data:`HEADER_READ` bytes as received, to parse while its file is still being written
    head: bytes | None = None


class _NeedsFile(Exception):
    """The received header bytes are not enough for this part: parse it again once its file is written."""


@dataclass
class Outcome:
    sop_class: str | None
    sop_uid: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    warning: int | None = None
    reason: str = ""
    # internal (plain data, so parsing can run in a worker process)
    tmp: Path | None = None
    rows: tuple | None = None  # (study, series, instance) index rows, filled in by the store
    meta_json: str | None = None
    content: tuple[list, list] = ([], [])  # SR items, SEG segments
    size: int = 0
    retry: bool = False  # parsed from its received header, it needs its file: parse again once written
    rel: str | None = None  # blob path once committed
    indexed: bool = False  # its index rows are committed
    patient_key: tuple[str | None, str | None] = (None, None)
    patient_meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImportResult:
    """What ``fedgate import`` did with one file."""

    file: str
    status: str  # stored | duplicate | skipped | failed
    sop_uid: str | None = None
    reason: str = ""


UNCOMPRESSED_TS = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _parse_part(part: Part, study_in_path: str | None) -> Outcome:
    """Read and check one instance file (worker process). Never raises; failures are in the Outcome, with
    a reason written for people (:func:`failure_reason`): one bad part never fails the request."""
    try:
        return _parse_checked(part, study_in_path)
    except Exception as exc:  # whatever a malformed file makes a reader raise fails it alone
        return Outcome(None, None, failure=CANNOT_UNDERSTAND, reason=failure_reason(exc))


_LENGTH_VR = re.compile(r"parse \(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\) according to VR '([A-Z]{2})'")
_TAG_IN = re.compile(r"\(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)")


def failure_reason(exc: BaseException) -> str:
    """A STOW failure reason for people (never the reader's raw exception text: it may quote values)."""
    from pydicom.errors import BytesLengthException

    if isinstance(exc, attrs.InvalidInstance):
        return str(exc)[:300]  # fedgate's own words, naming the attribute
    if isinstance(exc, InvalidDicomError):
        return ("not a DICOM PS3.10 file: the 128-byte preamble followed by 'DICM' and the file meta "
                "information are missing")
    if isinstance(exc, BytesLengthException):
        m = _LENGTH_VR.search(str(exc))
        where = f"element ({m[1]},{m[2]}) is encoded as VR {m[3]} but " if m else "an element's "
        return f"{where}its value length does not fit that VR (not a whole number of values)"
    if isinstance(exc, RecursionError) or "Recursion limit" in str(exc):
        return f"sequences are nested more than {attrs.MAX_SEQUENCE_DEPTH} levels deep (the most fedgate accepts)"
    if isinstance(exc, (EOFError, struct.error)):
        return "the file ends inside an element: it is truncated or an element's length is wrong"
    if isinstance(exc, MemoryError):
        return "an element's length is larger than the file (a huge or corrupt length)"
    m = _TAG_IN.search(str(exc))
    at = f" (at element ({m[1]},{m[2]}))" if m else ""
    return (f"the data set could not be read{at}: an element's VR, length or value does not follow the "
            "transfer syntax")


def _parse_checked(part: Part, study_in_path: str | None) -> Outcome:
    if part.failure is not None:
        return Outcome(None, None, failure=part.failure, reason=part.reason)
    try:
        ds, ts, meta = _read_header(part)
        if ds is None:  # not the common layout: read it all, as before
            if part.head is not None:
                raise _NeedsFile
            ds, ts, meta = _read_full(part)
    except _NeedsFile:
        return Outcome(None, None, retry=True)
    except Exception as exc:  # see _parse_part
        return Outcome(None, None, failure=CANNOT_UNDERSTAND, reason=failure_reason(exc))
    src = attrs.MetaView(meta, ds)  # index values from the decoded metadata, not a second pydicom conversion
    out = Outcome(*(attrs.text(src, kw) for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                    "SeriesInstanceUID")))
    if study_in_path and out.study_uid != study_in_path:
        out.failure, out.reason = UID_MISMATCH, f"StudyInstanceUID {out.study_uid} differs from the URL's {study_in_path}"
        return out
    out.tmp, out.size = part.tmp, part.size
    if attrs.sequence_depth(meta) > attrs.MAX_SEQUENCE_DEPTH:
        raise attrs.InvalidInstance(f"sequences are nested more than {attrs.MAX_SEQUENCE_DEPTH} levels deep "
                                    "(the most fedgate accepts)")
    out.meta_json = orjson.dumps(meta).decode()
    out.rows = attrs.index_rows(src, blob_path="", size=part.size, transfer_syntax=ts, now=0.0, patient_id=None)
    try:
        out.content = _content_rows(ds, out.sop_class)
    except (EOFError, OSError, struct.error) as exc:  # a sequence cut short (truncated SR): nothing stored
        return Outcome(out.sop_class, out.sop_uid, out.study_uid, out.series_uid, failure=CANNOT_UNDERSTAND,
                       reason=failure_reason(exc))
    out.patient_key = (attrs._s(src, "PatientID", 64), attrs._s(src, "IssuerOfPatientID", 64))
    out.patient_meta = {"sex": attrs._s(src, "PatientSex", 16), "birth": attrs._s(src, "PatientBirthDate", 8)}
    if reason := attrs.control_character(out.rows, out.content):  # NUL etc.: refused on both engines
        return Outcome(out.sop_class, out.sop_uid, out.study_uid, out.series_uid, failure=CANNOT_UNDERSTAND,
                       reason=reason)
    return out


def _transfer_syntax(ds) -> str:
    ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else ""
    if not ts:
        raise attrs.InvalidInstance("file meta TransferSyntaxUID is missing")
    attrs.check_uid("TransferSyntaxUID", ts)
    return ts


def _pixel_meta(ds, ts: str) -> dict:
    return {"vr": "OB" if ts not in UNCOMPRESSED_TS or (ds.get("BitsAllocated") or 8) <= 8 else "OW",
            "BulkDataURI": f"{attrs.BULK_PREFIX}7FE00010"}


#: bytes read at once for the header of a STOW instance: pydicom asks the file object for its position at
#: every element (an lseek system call on a file, ~75 per CT instance); from memory it costs nothing
HEADER_READ = 64 * 1024


def _read_header(part: Part):
    """The fast path: read up to the pixel data only (parsed from one :data:`HEADER_READ` read where the
    header ends inside it, else from the file), check the pixel data's length from its element header,
    encode the metadata with :mod:`mappings.dicom.fastjson`. Returns (None, None, None) when the file is
    not of the common layout (SEG, encapsulated pixel data, elements after the pixel data, big
    endian, float pixel data), so that :func:`_read_full` handles it exactly as before. ``part.head``: the
    part's first bytes as received (the same bytes as that read), parsed before the file is complete;
    what would need the file raises :class:`_NeedsFile`."""
    f = open(part.tmp, "rb") if part.head is None else None
    try:
        data = f.read(HEADER_READ) if f is not None else part.head
        ds = None
        pixel_at = -1
        fast = rawread.read_header(data) if len(data) in (part.size, HEADER_READ) else None
        if fast is not None:  # the common layout (see mappings.dicom.rawread): as dcmread reads it
            ds, _ts, pixel_at = fast
        elif len(data) == part.size:  # the whole file: parse it from memory
            src = io.BytesIO(data)
            ds = dcmread(src, defer_size=1024, stop_before_pixels=True)
            pixel_at = src.tell()
        elif len(data) == HEADER_READ:
            try:
                src = io.BytesIO(data)
                ds = dcmread(src, defer_size=1024, stop_before_pixels=True)
                pixel_at = src.tell()
            except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError,
                    NotImplementedError, struct.error, OSError):
                ds = None  # perhaps only cut short by the buffer: read it from the file below
        if ds is not None:
            if len(data) < part.size and pixel_at + 12 > len(data):
                ds = None  # the header does not end inside the buffer (or a read went past it)
            else:
                head = data[pixel_at:pixel_at + 12] if pixel_at < part.size else b""
        if ds is None:
            if f is None:
                raise _NeedsFile
            f.seek(0)
            ds = dcmread(f, defer_size=1024, stop_before_pixels=True)
            pixel_at = f.tell()
            head = f.read(12) if pixel_at < part.size else b""
    finally:
        if f is not None:
            f.close()
    # the metadata first: an element pydicom has converted (by an access) is encoded by pydicom, slowly
    meta = fastjson.dataset_json(ds, bulk_data_threshold=attrs.BULK_THRESHOLD,
                                 bulk_data_element_handler=attrs.bulk_handler)
    src = attrs.MetaView(meta, ds)  # the checks read the decoded metadata, not pydicom conversions
    attrs.check_instance(src)
    ts = _transfer_syntax(ds)
    if attrs.text(src, "SOPClassUID") == SEG_CLASS or ts == "1.2.840.10008.1.2.2":
        return None, None, None
    length = None
    if head:
        if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
            return None, None, None
        if ts == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
            length, header = struct.unpack("<L", head[4:8])[0], 8
        elif head[4:6] in (b"OB", b"OW") and len(head) == 12:
            length, header = struct.unpack("<L", head[8:12])[0], 12
        else:
            return None, None, None
        if length == 0xFFFFFFFF:
            return None, None, None  # encapsulated (compressed) frames
        end = pixel_at + header + length
        if end > part.size:
            raise attrs.InvalidInstance("PixelData is truncated")
        if end < part.size:
            return None, None, None  # elements after the pixel data
        if ts in UNCOMPRESSED_TS:
            _check_expected_length(src, length)
    if length is not None:
        meta.pop("7FE00010", None)
        meta["7FE00010"] = _pixel_meta(src, ts)
    elif "7FE00010" not in meta and ds.get("Rows") is not None:
        meta["7FE00010"] = attrs.pixel_placeholder(ds)
    return ds, ts, meta


def _read_full(part: Part):
    ds = dcmread(part.tmp, defer_size=1024)
    attrs.check_instance(ds)
    ts = _transfer_syntax(ds)
    if "PixelData" in ds:
        _check_pixel_length(ds, part.size, ts)
    meta_ds = ds.copy()
    if "PixelData" in meta_ds:
        del meta_ds["PixelData"]
    meta = attrs.metadata_json(meta_ds)
    if "PixelData" in ds:
        meta["7FE00010"] = _pixel_meta(ds, ts)
    return ds, ts, meta


def parse_parts(parts: list[Part], study_in_path: str | None) -> list[Outcome]:
    """Parse every received part (runs in a worker process; everything returned is plain data)."""
    return [_parse_part(p, study_in_path) for p in parts]


def _check_pixel_length(ds, file_size: int, ts: str) -> None:
    """A truncated file reads without error (pydicom returns a short value): compare with the header."""
    raw = ds.get_item("PixelData")
    deferred = getattr(raw, "value", b"") is None
    length = raw.length if deferred else len(raw.value or b"")
    if deferred and raw.length != 0xFFFFFFFF and raw.value_tell + raw.length > file_size:
        raise attrs.InvalidInstance("PixelData is truncated")
    if ts in UNCOMPRESSED_TS:
        _check_expected_length(ds, length)


def _check_expected_length(ds, length: int) -> None:
    from mappings.dicom.pixels import native_frame_bits

    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        spp, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 8)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise attrs.InvalidInstance("Rows, Columns, SamplesPerPixel, BitsAllocated or NumberOfFrames is not "
                                    "a number") from None
    photometric = str(ds.get("PhotometricInterpretation") or "")
    expected = (native_frame_bits(rows, cols, spp, bits, photometric) * frames + 7) // 8
    if length < expected:
        raise attrs.InvalidInstance(f"PixelData holds {length} bytes, the header needs {expected} (truncated)")


def _content_rows(ds, sop_class: str) -> tuple[list[dict], list[dict]]:
    """SR content items and SEG segments of a dataset (worker thread)."""
    sr, seg = [], []
    try:
        if sop_class.startswith(SR_CLASS_PREFIX):
            from mappings.dicom.sr import sr_items

            sr = sr_items(ds)
        elif sop_class == SEG_CLASS:
            from mappings.dicom.seg import seg_segments

            seg = seg_segments(ds)
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        log.warning("content not indexed: %s", type(exc).__name__)
    return sr, seg


#: parse calls in flight in this server process (all STOW requests together) below which a part that has
#: arrived goes to the worker at once, beside its request's earlier calls (see ParseFeed)
PARSE_PIPELINE = 4


class ParseFeed:
    """Parse (worker process) and fsync (threads) the parts of one STOW request while it is still arriving.

    :meth:`add` is called by the receiving loop as each part is complete: its fsync starts at once, and it
    is handed to the worker at once while the process has fewer than :data:`PARSE_PIPELINE` parse calls in
    flight (a lightly loaded server: a call's hand-over to the worker process and back costs milliseconds
    of latency, so a request's last part should not wait for its previous call to return), else with
    whatever parts arrived while its request's previous call was being parsed — one call per group, not
    per part, so a busy worker gets bigger groups. :meth:`results` waits for all of it. Neither step ever
    raises for a bad part (failures are in the Outcome / the returned errors).
    """

    _active = 0  # parse calls in flight in this process

    def __init__(self, workers: WorkerPool, study_in_path: str | None) -> None:
        self.workers = workers
        self.study = study_in_path
        self.slots: list[Outcome | None] = []
        self._pending: list[tuple[int, Part]] = []
        self._jobs: set[asyncio.Future] = set()  # this request's parse calls in flight
        self._syncs: list[tuple[Path, asyncio.Future]] = []
        self._writes: dict[int, asyncio.Future] = {}  # part index → its file's write (a failed one fails it)

    def add(self, part: Part, written: asyncio.Future | None = None, synced: asyncio.Future | None = None) -> None:
        """``written``: a future done when the part's file is complete (parsing waits for it; its exception
        fails the part with 0xA700), else the file is complete now. ``synced``: its fsync already under way
        (a future of its OSError or None), else it starts here."""
        self.slots.append(None)
        if part.failure is not None:  # rejected while streaming: nothing to parse
            self.slots[-1] = Outcome(None, None, failure=part.failure, reason=part.reason)
            return
        self._syncs.append((part.tmp, synced if synced is not None else asyncio.ensure_future(self._fsync(part.tmp))))
        i = len(self.slots) - 1
        if written is not None:
            self._writes[i] = written
        if written is None or part.head is not None:  # (the latter: parsed now, while the file is being written)
            self._ready(i, part, None)
        else:
            written.add_done_callback(lambda w: self._ready(i, part, w))

    @staticmethod
    def _failed(written: asyncio.Future) -> bool:
        return written.cancelled() or written.exception() is not None

    def _ready(self, i: int, part: Part, written: asyncio.Future | None) -> None:
        if written is not None and self._failed(written):
            return  # not parsed: results() answers the part 0xA700
        self._pending.append((i, part))
        if not self._jobs or ParseFeed._active < PARSE_PIPELINE:
            self._submit()

    @staticmethod
    async def _fsync(tmp: Path) -> OSError | None:
        try:
            await asyncio.to_thread(BlobStore.fsync, tmp)
        except OSError as exc:
            return exc
        return None

    def _submit(self) -> None:
        group, self._pending = self._pending, []
        job = asyncio.ensure_future(self._parse(group))
        self._jobs.add(job)
        ParseFeed._active += 1
        job.add_done_callback(self._next)

    async def _parse(self, group: list[tuple[int, Part]]) -> None:
        outcomes = await self.workers.run(parse_parts, [p for _, p in group], self.study)
        for (i, p), o in zip(group, outcomes):
            p.head = None  # (parsed: the bytes are not needed any more)
            if not o.retry:
                self.slots[i] = o
                continue
            written = self._writes[i]  # its header needs the file: parse it from the file once written
            if written.done():
                self._ready(i, p, written)
            else:
                written.add_done_callback(lambda w, i=i, p=p: self._ready(i, p, w))

    def _next(self, job: asyncio.Future) -> None:
        self._jobs.discard(job)
        ParseFeed._active -= 1
        if self._pending and not job.cancelled() and (not self._jobs or ParseFeed._active < PARSE_PIPELINE):
            self._submit()

    @staticmethod
    def discard(feed: "ParseFeed | None", parts: list[Part]) -> None:
        """Remove the parts' temp files — a file whose writer thread is still at work once it is done (the
        thread creates it: removed now, it would be left behind)."""
        jobs = {tmp: fut for tmp, fut in feed._syncs} if feed is not None else {}
        for p in parts:
            if p.tmp is None:
                continue
            fut = jobs.get(p.tmp)
            if fut is not None and not fut.done():
                fut.add_done_callback(lambda _f, tmp=p.tmp: _unlink_quietly(tmp))
            _unlink_quietly(p.tmp)

    async def results(self) -> tuple[list[Outcome], dict[Path, OSError]]:
        """Every part's Outcome (in order) and the fsync errors by temp path."""
        if self._writes:  # (their done-callbacks, registered first, have run when this returns)
            await asyncio.gather(*self._writes.values(), return_exceptions=True)
        while self._jobs or self._pending:
            if self._pending and not self._jobs:
                self._submit()
            jobs = set(self._jobs)
            await asyncio.wait(jobs)  # (their _next callbacks, registered first, have run when this returns)
            for job in jobs:
                job.result()  # a failed call (not a failed part: those are Outcomes) fails the request
        for i, written in self._writes.items():  # a part whose file was not written fails, whatever its parse said
            if self._failed(written):
                exc = None if written.cancelled() else written.exception()
                self.slots[i] = Outcome(None, None, failure=OUT_OF_RESOURCES, reason=_disk_reason(exc))
        errors = {tmp: err for tmp, fut in self._syncs if (err := await fut) is not None}
        if any(o is None for o in self.slots):
            raise RuntimeError("STOW: a received part was not parsed")  # a bug: never drop a part silently
        return list(self.slots), errors


@dataclass
class _Batch:
    """One STOW request waiting for its index rows to be written (see ``_index_batched``)."""

    outcomes: list[Outcome]
    turn: asyncio.Future  # result "done" (written by the leader) or "lead" (this request writes next)


class DicomwebService:
    #: the application's :class:`~gateway.metrics.Metrics` (instances and bytes stored), wired at start-up
    metrics_observer = None

    def __init__(self, db: Database, gate: Gate, audit: AuditSink, blobs: BlobStore,
                 workers: WorkerPool | None = None) -> None:
        self.workers = workers or WorkerPool(0)
        self.db = db
        self.gate = gate
        self.audit = audit
        self.blobs = blobs
        self._queue: list[_Batch] = []
        self._leading = False
        self._stmts: dict[tuple, Any] = {}

    # ---------------------------------------------------------------------------------- STOW-RS
    def parse_feed(self, study_in_path: str | None) -> "ParseFeed":
        """A feed for the parts of one STOW request: each part is parsed and fsync-ed as soon as it has
        arrived, while the rest of the body is still being received (see :class:`ParseFeed`)."""
        return ParseFeed(self.workers, study_in_path)

    async def store(self, requester: Requester, parts: list[Part], study_in_path: str | None,
                    retrieve_base: str, feed: "ParseFeed | None" = None,
                    outcomes_out: list | None = None) -> tuple[int, dict]:
        """Store the received parts; returns (HTTP status, DICOM JSON response dataset) per PS3.18 10.5.3.
        ``feed``: the :meth:`parse_feed` the parts were given to while they arrived (else they are parsed now).
        ``outcomes_out``: if given, receives every part's :class:`Outcome`, in the order of ``parts``."""
        try:
            require_write(requester)
            if feed is None:
                feed = self.parse_feed(study_in_path)
                for p in parts:
                    feed.add(p)
            # the rename into place below happens only for instances that passed every check
            outcomes, sync_errors = await feed.results()
        except BaseException:  # refused or cancelled: no temp file left behind
            ParseFeed.discard(feed, parts)
            raise
        if self.blobs.unwritable:  # a read-only store: every instance 0xA700, nothing half stored
            for o in outcomes:
                if o.failure in (None, OUT_OF_RESOURCES):  # (its part's file could not be written either)
                    o.failure, o.reason = OUT_OF_RESOURCES, (f"the DICOM store cannot be written "
                                                             f"({self.blobs.unwritable}): nothing was stored")
        for o in outcomes:  # a part whose file did not reach the disk (fsync failed: EIO, ENOSPC): 0xA700
            if o.failure is None and (err := sync_errors.get(o.tmp)) is not None:
                o.failure, o.reason = OUT_OF_RESOURCES, _disk_reason(err)
        # the same SOP twice in one request: keep the first
        seen: set[str] = set()
        for o in outcomes:
            if o.failure is None:
                if o.sop_uid in seen:
                    o.failure, o.reason = DUPLICATE_SOP, "the SOP Instance UID occurs twice in this request"
                seen.add(o.sop_uid)
        good = [o for o in outcomes if o.failure is None]
        committed: list[Outcome] = []
        try:
            if good:
                await self._check_duplicates(good)
                new = [o for o in good if o.failure is None and o.warning is None]
                # files go into place before (and outside) the write transaction: rename only (already
                # fsync-ed), never under the (SQLite: serialised) write lock; each stored version gets its own path
                await asyncio.to_thread(self._commit_files, new, committed)
                new = [o for o in new if o.failure is None]  # (a file that could not be put in place: 0xA700)
                if new:
                    await self._index_batched(new)
        finally:
            for o in committed:  # rows not written (error, cancellation): no file without its row
                if not o.indexed and o.failure is None:
                    self.blobs.remove(o.rel)
            if good:
                self.blobs.pending(done=[o.rel for o in good if o.rel])
            ParseFeed.discard(feed, parts)
        if good:
            self.db.note_writes(len(good))
        stored = [o for o in outcomes if o.failure is None]
        failed = [o for o in outcomes if o.failure is not None]
        if outcomes_out is not None:
            outcomes_out.extend(outcomes)
        if self.metrics_observer is not None:
            dup = sum(1 for o in stored if o.warning == WARNING_IDENTICAL)
            self.metrics_observer.observe_stow(len(stored) - dup, dup, len(failed),
                                               sum(o.size for o in stored if o.warning != WARNING_IDENTICAL))
        await self.audit.record(AccessRecord(
            requester, "C", "stow", "0" if not failed else ("4" if stored else "8"),
            tuple(f"ImagingStudy/{u}" for u in sorted({o.study_uid for o in stored}))[:200], (), "", "",
        ))
        body: dict[str, Any] = {}
        if study_in_path:
            body["00081190"] = {"vr": "UR", "Value": [f"{retrieve_base}/studies/{study_in_path}"]}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [self._failed_item(o) for o in failed]}
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [self._ref_item(o, retrieve_base) for o in stored]}
        # PS3.18 10.5.3: 200 all stored cleanly, 202 some failed or warned, 409 none stored
        status = 409 if not stored else (202 if failed or any(o.warning for o in stored) else 200)
        return status, body

    @staticmethod
    def _failed_item(o: Outcome) -> dict:
        item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [o.failure]}}
        if o.sop_class:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class]}
        if o.sop_uid:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_uid]}
        if o.reason:
            item["00090010"] = {"vr": "LO", "Value": ["FEDGATE"]}
            item["00091010"] = {"vr": "LT", "Value": [o.reason]}  # private: human-readable reason
        return item

    @staticmethod
    def _ref_item(o: Outcome, base: str) -> dict:
        item = {
            "00081150": {"vr": "UI", "Value": [o.sop_class]},
            "00081155": {"vr": "UI", "Value": [o.sop_uid]},
            "00081190": {"vr": "UR", "Value": [f"{base}/studies/{o.study_uid}/series/{o.series_uid}"
                                               f"/instances/{o.sop_uid}"]},
        }
        if o.warning:
            item["00081196"] = {"vr": "US", "Value": [o.warning]}
        return item

    async def _patient_ids(self, conn, outcomes: list[Outcome]) -> tuple[dict[tuple, str], dict[str | None, int | None]]:
        """Common-model patient id per (PatientID, Issuer): a FHIR Patient with that identifier, or a
        DICOM-born patient (created here, consent recomputed in this transaction); and the consent number
        of each (read with :func:`~gateway.store.consent_schema.lock_patients`, which also tells which
        DICOM-born patients exist already)."""
        from gateway.store.consent_schema import lock_patients, patient_nos, recompute

        out: dict[tuple, str] = {}
        dicom_born: set[str] = set()
        for key in {o.patient_key for o in outcomes}:
            pid, issuer = key
            match = None
            if pid:
                q = built_once(("stow patient", bool(issuer)), lambda: _patient_match_stmt(bool(issuer)))
                rows = (await conn.execute(q, {"p_code": pid, "p_sys": issuer, "p_oid": f"urn:oid:{issuer}"}
                                           if issuer else {"p_code": pid})).scalars().all()
                match = rows[0] if len(rows) == 1 else None
            if match is None:
                match = attrs.dicom_patient_key(pid, issuer)
                dicom_born.add(match)
            out[key] = match
        known = await lock_patients(conn, out.values())
        created: list[str] = []
        for key, match in out.items():
            if match in dicom_born and match not in known and match not in created:
                pid, issuer = key
                meta = next(o.patient_meta for o in outcomes if o.patient_key == key)
                birth = meta.get("birth")
                await conn.execute(s.cm_patient.insert().values(
                    src_type="DICOM", src_id=f"DICOM/{match}", patient_id=match,
                    identifiers=orjson.dumps([f"{issuer or ''}|{pid}"] if pid else []).decode(),
                    birth_date=f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}" if birth and len(birth) == 8 else None,
                    birth_year=int(birth[:4]) if birth and birth[:4].isdigit() else None,
                    sex={"M": "male", "F": "female", "O": "other"}.get(meta.get("sex") or "", None),
                ))
                created.append(match)
        if created:
            await recompute(conn, created)
            return out, await patient_nos(conn, out.values())
        nos: dict[str | None, int | None] = {p: profile_no(known.get(p)) for p in out.values()}
        nos[None] = NO_PATIENT
        return out, nos

    async def _check_duplicates(self, good: list[Outcome]) -> None:
        """Already stored SOP Instance UIDs: identical bytes → warning (no change), different → 0x0111."""
        existing: dict[str, str] = {}
        uids = [o.sop_uid for o in good]
        for i in range(0, len(uids), 50):
            chunk = uids[i:i + 50]
            # one statement per list length, so Database.read_rows compiles it once
            stmt = built_once(("stow dup", len(chunk)), lambda: select(
                dcm_instance.c.sop_uid, dcm_instance.c.blob_path).where(
                dcm_instance.c.sop_uid.in_([bindparam(f"u{j}") for j in range(len(chunk))])))
            rows = await self.db.read_rows(stmt, {f"u{j}": u for j, u in enumerate(chunk)})
            existing.update((r["sop_uid"], r["blob_path"]) for r in rows)
        for o in good:
            if o.sop_uid in existing:
                same = await asyncio.to_thread(
                    lambda: BlobStore.digest(self.blobs.path(existing[o.sop_uid])) == BlobStore.digest(o.tmp))
                if same:
                    o.warning = WARNING_IDENTICAL
                else:
                    o.failure, o.reason = DUPLICATE_SOP, ("an instance with this SOP Instance UID and different "
                                                          "content is already stored")

    def _commit_files(self, new: list[Outcome], done: list[Outcome]) -> None:
        """Rename the (fsync-ed) files into place, then fsync their directories. The storage failing
        (ENOSPC for a new directory, EIO, ...) fails the instances concerned with 0xA700 — the others of
        the request go on; a directory fsync failing fails every file renamed into place here (removed)."""
        dirty: set[str] = set()
        for o in new:
            try:
                o.rel = self.blobs.relative_path(o.study_uid, o.series_uid, o.sop_uid)
            except ValueError:  # (parsing checked the UIDs already: a second line of defence)
                o.failure, o.reason = CANNOT_UNDERSTAND, "a UID of the instance cannot name a storage path"
        # journalled before the renames: if this process dies before their rows are committed, the process
        # started in its place removes the files that got no row (see BlobStore.pending / adopt_dead_journals)
        self.blobs.pending(add=[o.rel for o in new if o.failure is None])
        for o in new:
            if o.failure is not None:
                continue
            try:
                self.blobs.commit(o.tmp, o.rel, fsynced=True, dirty=dirty)
            except OSError as exc:  # nothing was moved (mkdir / rename failed): the temp file is removed later
                o.failure, o.reason = OUT_OF_RESOURCES, _disk_reason(exc)
                continue
            done.append(o)
        try:
            self.blobs.sync_dirs(dirty)  # before the index rows: no acknowledged row whose file name may be lost
        except OSError as exc:
            for o in done:
                self.blobs.remove(o.rel)
                o.failure, o.reason = OUT_OF_RESOURCES, _disk_reason(exc)
            done.clear()

    async def _index_batched(self, new: list[Outcome]) -> None:
        """Index rows of concurrent STOW requests written in one transaction (group commit).

        The first request that finds no transaction in progress leads: it opens the write transaction and
        only then takes everything queued (its own instances and those of requests that arrived meanwhile,
        including while it waited for the write lock — another server process's transaction, an audit
        flush), writes them, marks them ``indexed``, wakes their requests, and hands the lead to the next
        queued request, if any. At concurrency 1 this is one transaction per request as before; at 16 the
        per-transaction work (patient match, study and series counts, ImagingStudy sync) is shared by
        every request in the batch. If a batch of several requests fails, each request is retried in a
        transaction of its own, so one request's failure never fails another's.
        """
        entry = _Batch(new, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        if self._leading and await self._wait_turn(entry) == "done":
            return
        self._leading = True
        taken: list[_Batch] = []
        written = False
        try:
            await self._write_group(entry, taken)
            written = True
        finally:
            if not written:  # our own failure (or cancellation): the others go back to the queue, untouched
                if entry in self._queue:  # failed before taking the queue (waiting for the write lock)
                    self._queue.remove(entry)
                self._queue[:0] = [b for b in taken if b is not entry and not b.turn.done()]
            self._leading = False
            if self._queue:  # hand the lead on
                self._leading = True
                self._queue[0].turn.set_result("lead")

    async def _wait_turn(self, entry: _Batch) -> str:
        """Wait until a leader wrote our rows ("done") or handed us the lead ("lead")."""
        try:
            return await asyncio.shield(entry.turn)
        except asyncio.CancelledError:
            if entry in self._queue:  # not taken by a leader: nothing of ours is being written
                self._queue.remove(entry)
                if entry.turn.done() and not entry.turn.exception() and self._queue:  # we had the lead: pass it
                    self._queue[0].turn.set_result("lead")
                elif entry.turn.done():
                    self._leading = bool(self._queue)
                raise
            while not entry.turn.done():  # a leader is writing our rows: let it finish so rows and files agree
                try:
                    await asyncio.shield(entry.turn)
                except asyncio.CancelledError:
                    continue
                except SQLAlchemyError:
                    break
            raise

    async def _write_group(self, entry: _Batch, taken: list[_Batch]) -> None:
        """Write the queued requests (``entry``, the leader's, among them) in one transaction; the queue is
        taken into ``taken`` once the transaction holds the write lock."""
        try:
            async with self.db.write(inline=True) as conn:  # short, many small statements: see Database.write
                # the batch is taken only now: requests that arrived while the lock was busy join it
                taken[:], self._queue = self._queue, []
                outcomes = [o for b in taken for o in b.outcomes]
                await self._index(conn, outcomes)
        except SQLAlchemyError:
            if len(taken) <= 1:
                raise
            for b in taken:  # isolate the failing request: each in a transaction of its own
                if b is entry:
                    continue
                try:
                    await self._write_batch(b.outcomes)
                except SQLAlchemyError as exc:
                    b.turn.set_exception(exc)
                else:
                    b.turn.set_result("done")
            await self._write_batch(entry.outcomes)
            return
        for o in outcomes:
            o.indexed = True
        for b in taken:
            if b is not entry:
                b.turn.set_result("done")

    async def _write_batch(self, outcomes: list[Outcome]) -> None:
        async with self.db.write(inline=True) as conn:
            await self._index(conn, outcomes)
        for o in outcomes:
            o.indexed = True

    async def _index(self, conn, good: list[Outcome]) -> None:
        """Index rows, study/series counts and the FHIR ImagingStudy of a batch, on ``conn`` (one
        transaction).  About 14 statements for a batch within one study (was ~37): the study and series
        rows are inserted with ON CONFLICT DO NOTHING (first writer's attributes win) instead of being
        looked up first; the instance rows likewise, their RETURNING telling which SOP instances another
        request stored first (no separate look-up); counts are updated with one statement per table (the
        study's returning its row when the batch holds one study); the ImagingStudy is extended with the new
        instances instead of being rebuilt from every instance row (see :meth:`_sync_imaging_studies`) and
        written with only the index rows that changed (:func:`gateway.store.fhir_repo.apply_writes`)."""
        if conn.dialect.name == "postgresql":
            # One STOW index transaction at a time across server processes (processes > 1), as SQLite's
            # write lock file gives: the study/series upserts, count updates and the ImagingStudy
            # read-modify-write below must see every committed instance of the study (READ COMMITTED
            # alone lets two transactions each miss the other's rows). Parsing and files stay parallel.
            await conn.execute(select(func.pg_advisory_xact_lock(STOW_INDEX_LOCK)))
        now = time.time()
        pids, nos = await self._patient_ids(conn, good)
        batch: dict[str, Outcome] = {}
        for o in good:
            if o.failure is not None:  # found raced by an earlier try of this batch
                continue
            if o.sop_uid in batch:  # two requests of this batch with one SOP Instance UID: the first wins
                o.failure, o.reason = DUPLICATE_SOP, "stored concurrently by another request"
                self.blobs.remove(o.rel)
                continue
            batch[o.sop_uid] = o
        studies: dict[str, dict] = {}
        series: dict[str, dict] = {}
        instances: list[dict] = []
        for o in batch.values():
            pid = pids[o.patient_key]
            st, se, inst = (dict(r, patient_id=pid, consent_no=nos[pid]) for r in o.rows)
            st["updated_ts"] = se["updated_ts"] = now
            inst.update(blob_path=o.rel, stored_ts=now, metadata=o.meta_json)
            studies.setdefault(st["study_uid"], st | {"num_series": 0, "num_instances": 0})
            series.setdefault(se["series_uid"], se | {"num_instances": 0})
            instances.append(inst)
        if not instances:
            return
        # studies/series new to the store (first writer's attributes win; counts recomputed below)
        d = conn.dialect.name
        await conn.execute(built_once(("stow new", "study", d), lambda: _insert_new(conn, dcm_study, "study_uid")),
                           list(studies.values()))
        await conn.execute(built_once(("stow new", "series", d), lambda: _insert_new(conn, dcm_series, "series_uid")),
                           list(series.values()))
        # instances: one already stored (by a concurrent request since _check_duplicates, or another process)
        # is skipped, and missing from RETURNING; its study and series rows exist (written with it)
        inserted = set((await conn.execute(built_once(("stow new", "instance", d), lambda: _insert_new(
            conn, dcm_instance, "sop_uid").returning(dcm_instance.c.sop_uid)), instances)).scalars())
        sr_rows: list[dict] = []
        seg_rows: list[dict] = []
        added: dict[str, list[dict]] = {}
        for o, inst in zip(batch.values(), instances):
            if o.sop_uid not in inserted:
                o.failure, o.reason = DUPLICATE_SOP, "stored concurrently by another request"
                self.blobs.remove(o.rel)
                continue
            sr, seg = o.content
            base = {"sop_uid": o.sop_uid, "patient_id": inst["patient_id"]}
            sr_rows.extend(base | r for r in sr)
            seg_rows.extend(base | {"study_uid": o.study_uid, "series_uid": o.series_uid} | r for r in seg)
            added.setdefault(o.study_uid, []).append(inst)
        if not inserted:
            return
        if sr_rows:
            await conn.execute(table_insert(dcm_sr_item), sr_rows)
        if seg_rows:
            await conn.execute(table_insert(dcm_seg_segment), seg_rows)
        i, se_t, st_t = dcm_instance.c, dcm_series.c, dcm_study.c
        # concurrent writers of the same study (other processes) are serialised by STOW_INDEX_LOCK above
        # (PostgreSQL) or the write lock file (SQLite), so the counts, series and ImagingStudy read below
        # include their rows
        touched = sorted({inst["series_uid"] for insts in added.values() for inst in insts})
        await conn.execute(built_once(("stow series counts",), lambda: update(dcm_series).where(
            se_t.series_uid.in_(bindparam("b_series", expanding=True))).values(
            num_instances=select(func.count()).where(i.series_uid == se_t.series_uid).scalar_subquery(),
            updated_ts=bindparam("b_now"))), {"b_series": touched, "b_now": now})
        ser_rows = (await conn.execute(built_once(("stow series of studies",), lambda: select(dcm_series).where(
            se_t.study_uid.in_(bindparam("b_studies", expanding=True))).order_by(se_t.series_number)),
            {"b_studies": list(added)})).mappings().all()
        by_study: dict[str, list[dict]] = {u: [] for u in added}
        for r in ser_rows:
            by_study[r["study_uid"]].append(dict(r))
        counts = built_once(("stow study counts",), lambda: update(dcm_study).where(
            st_t.study_uid == bindparam("b_uid")).values(
            num_instances=select(func.count()).where(i.study_uid == st_t.study_uid).scalar_subquery(),
            num_series=bindparam("b_n"), modalities=bindparam("b_mods"), updated_ts=bindparam("b_now")))
        params = [{"b_uid": u, "b_n": len(rows), "b_now": now,
                   "b_mods": "\\".join(sorted({r["modality"] for r in rows if r["modality"]}))}
                  for u, rows in by_study.items()]
        st_rows = None
        if len(params) == 1:  # the usual batch: one study, whose updated row the ImagingStudy needs
            returning = built_once(("stow study counts returning",), lambda: counts.returning(*dcm_study.c))
            st_rows = {r["study_uid"]: dict(r) for r in (await conn.execute(returning, params[0])).mappings()}
        else:  # (no RETURNING for an executemany UPDATE): read after
            await conn.execute(counts, params)
        await self._sync_imaging_studies(conn, by_study, added, st_rows)

    async def _sync_imaging_studies(self, conn, series_by_study: dict[str, list[dict]],
                                    added: dict[str, list[dict]] | None = None,
                                    st_rows: dict[str, dict] | None = None) -> None:
        """Write/update the FHIR ImagingStudy of each study (id = the Study Instance UID) from the index rows
        (``series_by_study``: each study's series rows, ordered by series number; ``st_rows``: the study rows,
        read here when not given).

        ``added``: the instance rows this transaction inserted, by study. The current version is then
        extended with them instead of reading every instance row of the study again (a cost growing with the
        study) — only if that version is exactly what the
        index rows give (the resource built from the study and series rows and its own instance list equals
        it: not edited over FHIR) and the extended list has as many instances as the index counts (no rows
        removed behind it, e.g. by the start-up reconcile); otherwise it is rebuilt in full, as before. The
        result is the full rebuild's: instances ordered by instance number as the engine's ORDER BY orders
        them (NULL first on SQLite, last on PostgreSQL), equal numbers in the order they were stored."""
        uids = list(series_by_study)
        if st_rows is None:
            st_rows = {r["study_uid"]: dict(r) for r in (await conn.execute(
                select(dcm_study).where(dcm_study.c.study_uid.in_(uids)))).mappings()}
        # studies holding instances of several patients: per-patient parts for research answers;
        # their ImagingStudy lists only its subject's (the study row's patient's) series and instances
        conflicts = await dicom_views.sync_parts(conn, st_rows, added)
        await repo.lock_resources(conn, [("ImagingStudy", u) for u in uids])  # vs. FHIR API writers
        current = await repo.get_current_many(conn, [("ImagingStudy", u) for u in uids] + [("Endpoint", "dicomweb")])
        nulls_first = conn.dialect.name != "postgresql"
        inst_by_study: dict[str, list[dict]] = {}
        for uid in uids:
            if uid in conflicts:
                continue  # rebuilt below, from its subject's instances only
            merged = _extended_instances(current.get(("ImagingStudy", uid)), st_rows[uid], series_by_study[uid],
                                         (added or {}).get(uid), nulls_first)
            if merged is not None:
                inst_by_study[uid] = merged
        rebuild = [u for u in uids if u not in inst_by_study]
        if rebuild:
            inst = (await conn.execute(select(
                dcm_instance.c.study_uid, dcm_instance.c.series_uid, dcm_instance.c.sop_uid,
                dcm_instance.c.sop_class_uid, dcm_instance.c.instance_number, dcm_instance.c.patient_id).where(
                dcm_instance.c.study_uid.in_(rebuild))
                .order_by(dcm_instance.c.instance_number))).mappings().all()
            for u in rebuild:
                inst_by_study[u] = []
            for r in inst:
                if r["study_uid"] not in conflicts or r["patient_id"] == st_rows[r["study_uid"]]["patient_id"]:
                    inst_by_study[r["study_uid"]].append({k: v for k, v in r.items() if k != "patient_id"})
        writes = []
        for uid in uids:
            series_rows = series_by_study[uid]
            study_row = st_rows[uid]
            if uid in conflicts:  # the subject's part: its own series (a shared series as its instances give it)
                study_row, series_rows = await dicom_views.subject_rows(conn, st_rows[uid], series_rows)
            resource = imaging_study_resource(study_row, series_rows, inst_by_study[uid])
            prev = current.get(("ImagingStudy", resource["id"]))
            # linked to the study's patient even when the subject names it by DICOM identifier only
            pid = st_rows[uid].get("patient_id")
            writes.append(repo.Write("ImagingStudy", resource["id"], resource, prev, "PUT" if prev else "POST",
                                     links=frozenset({pid}) if pid else frozenset()))
        if ("Endpoint", "dicomweb") not in current:
            from mappings.dicom.imagingstudy import endpoint_resource

            writes.append(repo.Write("Endpoint", "dicomweb", endpoint_resource(), None, "POST"))
        await repo.apply_writes(conn, writes)

    async def bulk_import(self, requester: Requester, files: list[Path]) -> list["ImportResult"]:
        """Store files already on disk (``fedgate import``) through the same path as STOW-RS; one
        :class:`ImportResult` per file, in order: stored, duplicate (identical instance already stored)
        or failed with the reason STOW would give."""
        import shutil

        parts = []
        for f in files:
            tmp = self.blobs.temp_path()
            shutil.copyfile(f, tmp)
            parts.append(Part(tmp, tmp.stat().st_size))
        outcomes: list[Outcome] = []
        await self.store(requester, parts, None, "", outcomes_out=outcomes)
        results = []
        for f, o in zip(files, outcomes):
            if o.failure is not None:
                results.append(ImportResult(str(f), "failed", o.sop_uid, o.reason or f"DICOM status 0x{o.failure:04X}"))
            else:
                results.append(ImportResult(str(f), "duplicate" if o.warning == WARNING_IDENTICAL else "stored",
                                            o.sop_uid))
        return results

    async def adopt_dead_journals(self) -> None:
        """In a serving process (``--processes N``): a sibling that died (kill -9) between renaming files
        into place and committing their rows left them listed in its journal; those without a row are
        removed now, so no file without its row waits for the next parent start."""
        if self.blobs.unwritable:
            return
        journals = await asyncio.to_thread(self.blobs.dead_journals)
        for journal, rels in journals:
            found: set[str] = set()
            for i in range(0, len(rels), 200):
                chunk = rels[i:i + 200]
                async with self.db.read() as conn:
                    found |= set((await conn.execute(select(dcm_instance.c.blob_path).where(
                        dcm_instance.c.blob_path.in_(chunk)))).scalars())
            gone = [r for r in rels if r not in found]
            for rel in gone:
                self.blobs.remove(rel)
            journal.unlink(missing_ok=True)
            if gone:
                log.warning("files of a dead server process without index rows removed", extra={"count": len(gone)})

    async def reconcile(self) -> None:
        """Start-up repair: temp files and unindexed files removed, rows without files dropped (not on a
        store that cannot be written: it is served read-only, as found)."""
        if self.blobs.unwritable:
            log.warning("blob store is not writable: serving it read-only (STOW answers 0xA700)",
                        extra={"error_type": self.blobs.unwritable})
            return
        async with self.db.read() as conn:
            indexed = set((await conn.execute(select(dcm_instance.c.blob_path))).scalars())
        removed, missing = await asyncio.to_thread(self.blobs.reconcile, indexed)
        if missing:
            async with self.db.write() as conn:
                gone = (await conn.execute(select(dcm_instance.c.sop_uid, dcm_instance.c.study_uid).where(
                    dcm_instance.c.blob_path.in_(sorted(missing))))).all()
                sops = [g.sop_uid for g in gone]
                for table in (dcm_sr_item, dcm_seg_segment):
                    await conn.execute(delete(table).where(table.c.sop_uid.in_(sops)))
                await conn.execute(delete(dcm_instance).where(dcm_instance.c.sop_uid.in_(sops)))
        if removed or missing:
            log.warning("blob store reconciled", extra={"files_removed": removed, "rows_removed": len(missing)})

    # ---------------------------------------------------------------------------------- QIDO-RS
    async def search(self, requester: Requester, level: str, q: QidoQuery,
                     warnings: list[str] | None = None, patients: list | None = None) -> tuple[list[dict], int]:
        """QIDO-RS. A research scope reads per-patient rows when conflicting studies (instances of several
        patients) are stored, so every answer is built from permitted instances only; an admin
        gets the conflicting studies among the results in ``warnings``."""
        scope = await self.gate.scope_for(requester)
        plain = qido_sql.statements(q, level, scope)
        with_meta = bool(q.extra_tags(level) or q.include_all)
        meta_stmt = self._meta_stmt(level, scope) if with_meta else None
        report = warnings is not None and requester.is_admin

        def read(conn) -> tuple[int, list[dict], list[str]]:  # one hand-over for every statement (read_sync)
            stmt, count_stmt = plain
            if not scope.unrestricted and conn.execute(dicom_views.has_conflicts_stmt()).first() is not None:
                stmt, count_stmt = qido_sql.statements(q, level, scope, self._views())
            total = conn.execute(count_stmt).scalar_one()
            results = [dict(r) for r in conn.execute(stmt).mappings()]
            if meta_stmt is not None:
                key = {"studies": "study_uid", "series": "series_uid", "instances": "sop_uid"}[level]
                for r in results:
                    meta = conn.execute(meta_stmt, {"uid": r[key], "pid": r.get("patient_id")}).scalar()
                    r["_meta"] = orjson.loads(meta) if meta else {}
            conflicts: list[str] = []
            if report and results:
                uids = sorted({r["study_uid"] for r in results})
                conflicts = list(conn.execute(dicom_views.conflicting_stmt(), {"b_uids": uids}).scalars())
            return total, results, conflicts

        total, results, conflicts = await self.db.read_sync(read)
        if warnings is not None:
            warnings += [f"study {u} holds instances of several patients (conflict: see fedgate dicom conflicts)"
                         for u in conflicts]
        await self._audit(requester, "E", f"qido-{level}", scope, {r.get("patient_id") for r in results})
        if patients is not None:  # each answer's common-model patient (a de-identified answer's date offset)
            patients += [r.get("patient_id") for r in results]
        return [q.render(level, r) for r in results], total

    @staticmethod
    def _views() -> dict:
        return {dcm_study: dicom_views.study_view(), dcm_series: dicom_views.series_view()}

    def _meta_stmt(self, level: str, scope: AccessScope):
        """Representative instance metadata for includefield (the first instance of the study/series) — for
        a research scope the first *permitted* instance of the row's own patient (a study's row may be one
        patient's part of a conflicting study), never another patient's."""
        key = {"studies": "study_uid", "series": "series_uid", "instances": "sop_uid"}[level]
        ck = ("qido meta", key, scope if not scope.unrestricted else None)
        stmt = self._stmts.get(ck)
        if stmt is None:
            c = dcm_instance.c
            stmt = select(c.metadata).where(getattr(c, key) == bindparam("uid"))
            if not scope.unrestricted:
                stmt = stmt.where(scope.row_clause(c.consent_no), c.patient_id.is_not_distinct_from(bindparam("pid")))
            stmt = stmt.order_by(c.instance_number).limit(1)
            if len(self._stmts) >= 256:
                self._stmts.clear()
            self._stmts[ck] = stmt
        return stmt

    async def _audit(self, requester: Requester, action: str, interaction: str, scope: AccessScope,
                     patients: Iterable[str | None], resources: Iterable[str] = ()) -> None:
        await self.audit.record(AccessRecord(
            requester, action, interaction, "0", tuple(resources)[:200],
            tuple(sorted(p for p in patients if p))[:200], scope.summary, "",
        ))

    # ---------------------------------------------------------------------------------- WADO-RS
    async def instances(self, requester: Requester, study: str, series: str | None = None,
                        sop: str | None = None, *, metadata: bool = True) -> list[dict]:
        """Visible instances of a study/series/instance (404 when none is visible); ``metadata=False``
        leaves out the stored DICOM JSON (a few KB per row) for routes that only need the file."""
        scope = await self.gate.scope_for(requester)
        stmt = self._instances_stmt(scope, bool(series), bool(sop), metadata)
        rows = await self.db.read_rows(stmt, {"study": study, "series": series, "sop": sop})
        if not rows:
            what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
            raise NotFound(f"{what} not found")
        await self._audit(requester, "R", "wado", scope, {r["patient_id"] for r in rows},
                          [f"ImagingStudy/{study}"])
        return rows

    def _instances_stmt(self, scope: AccessScope, by_series: bool, by_sop: bool, metadata: bool):
        """The WADO instance look-up, built once per (scope, shape) with bound parameters: building the
        SQLAlchemy statement cost about a fifth of a WADO instance request."""
        key = (scope, by_series, by_sop, metadata)
        stmt = self._stmts.get(key)
        if stmt is None:
            c = dcm_instance.c
            where = [c.study_uid == bindparam("study"), scope.row_clause(c.consent_no)]
            if by_series:
                where.append(c.series_uid == bindparam("series"))
            if by_sop:
                where.append(c.sop_uid == bindparam("sop"))
            cols = dcm_instance.c if metadata else [col for col in dcm_instance.c if col.name != "metadata"]
            stmt = select(*cols).where(and_(*where)).order_by(c.series_uid, c.instance_number, c.sop_uid)
            if len(self._stmts) >= 256:
                self._stmts.clear()
            self._stmts[key] = stmt
        return stmt

    async def stored_study_uids(self) -> list[str]:
        """Every stored Study Instance UID (for the de-identified UID index; answers nothing by itself)."""
        return [r["study_uid"] for r in await self.db.read_rows(dicom_views.study_uids_stmt(), {})]

    def blob_path(self, row: dict) -> Path:
        return self.blobs.path(row["blob_path"])


def _extended_instances(prev: "repo.Stored | None", study: dict, series: list[dict], added: list[dict] | None,
                        nulls_first: bool) -> list[dict] | None:
    """The instance rows of a study for :func:`imaging_study_resource`: those listed in its current
    ImagingStudy ``prev`` plus ``added``, in the full rebuild's order — or None when ``prev`` cannot be
    trusted to list exactly the stored instances (see ``DicomwebService._sync_imaging_studies``)."""
    if added is None or prev is None or prev.deleted or not prev.content:
        return None
    old = prev.resource()
    old.pop("meta", None)
    listed: list[dict] = []
    for se in old.get("series") or []:
        for item in se.get("instance") or []:
            code = (item.get("sopClass") or {}).get("code") or ""
            listed.append({"series_uid": se.get("uid"), "sop_uid": item.get("uid"),
                           "sop_class_uid": code[8:] if code.startswith("urn:oid:") else code,
                           "instance_number": item.get("number")})
    known = {se.get("uid") for se in old.get("series") or []}
    if imaging_study_resource(study, [r for r in series if r["series_uid"] in known], listed) != old:
        return None  # edited over FHIR, or study/series rows differ from what it was built from
    merged = listed + [{k: r[k] for k in ("series_uid", "sop_uid", "sop_class_uid", "instance_number")} for r in added]
    if len(merged) != study["num_instances"]:
        return None  # instance rows removed (or added) behind the ImagingStudy's back
    # a stable sort: the listed instances are in this order already, new ones go after equal numbers
    return sorted(merged, key=lambda r: ((r["instance_number"] is None) != nulls_first, r["instance_number"] or 0))


def _patient_match_stmt(with_issuer: bool):
    """FHIR Patients with a DICOM PatientID (``p_code``) as identifier, under the issuer's system (``p_sys``
    or ``p_oid``) when ``with_issuer``; distinct: a Patient may carry the same value under several systems."""
    t, r = s.idx_token, s.fhir_resource
    q = select(r.c.res_id).distinct().join(t, t.c.rid == r.c.rid).where(
        t.c.res_type == "Patient", t.c.param == "identifier", t.c.code == bindparam("p_code"), r.c.deleted.is_(False))
    if with_issuer:
        q = q.where(or_(t.c.system == bindparam("p_sys"), t.c.system == bindparam("p_oid")))
    return q.limit(2)


def _insert_new(conn, table, key: str):
    """INSERT that skips rows whose primary key exists already (SQLite and PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing(index_elements=[table.c[key]])


_UID = re.compile(r"[0-9.]{1,64}")


def _unlink_quietly(path: Path) -> None:
    """Remove a temp file; one that cannot be removed (a store gone read-only) is left to the start-up
    reconcile rather than failing the request whose instances were already answered for."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("a temp file could not be removed", extra={"error_type": os.strerror(exc.errno or 0)})


def _disk_reason(exc: BaseException | None) -> str:
    """A failure reason for a storage error (a part's write, its fsync, its rename, a directory fsync): what
    went wrong — the OS's words for an OSError —, never the path (it names the UIDs)."""
    code = getattr(exc, "errno", None)
    what = os.strerror(code) if code else type(exc).__name__ if exc is not None else "the write was cancelled"
    return f"the instance could not be stored: {what}"[:300]


def check_study_uid(uid: str) -> str:
    if not _UID.fullmatch(uid):
        raise BadRequest(f"{uid!r} is not a DICOM UID")
    return uid
