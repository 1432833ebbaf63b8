"""STOW-RS instance parsing (DICOM PS3.10 / PS3.18 §10.5), run in a worker process: the checks an
instance must pass to be stored, its index rows and DICOM JSON metadata, and the STOW failure reasons
(PS3.18 / PS3.4 status codes, reasons written for people). Everything returned is plain data."""

from __future__ import annotations

import io
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from gateway.errors import BadRequest
from mappings.dicom import attributes as attrs
from mappings.dicom import fastjson, rawread

log = logging.getLogger(__name__)

# PS3.18 / PS3.4 failure reasons used in FailedSOPSequence (documented in docs/dicomweb.md)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP = 0x0111
OUT_OF_RESOURCES = 0xA700
UID_MISMATCH = 0xA900  # StudyInstanceUID differs from the one in the request URL
CANNOT_UNDERSTAND = 0xC000
WARNING_IDENTICAL = 0xB000  # re-sent identical instance: accepted, nothing changed

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



_UID = re.compile(r"[0-9.]{1,64}")


def check_study_uid(uid: str) -> str:
    if not _UID.fullmatch(uid):
        raise BadRequest(f"{uid!r} is not a DICOM UID")
    return uid
