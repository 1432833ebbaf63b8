"""A stored DICOM file (PS3.10 bytes) de-identified to PS3.10 bytes (pure).

:func:`deidentify_part10` gives the bytes that ``dcmread`` → :func:`~mappings.deid.dicom.deidentify_dataset`
→ ``save_as(enforce_file_format=True)`` gives, without decoding or re-encoding the pixel data: the header is
read by :func:`mappings.dicom.rawread.read_header` (up to the pixel data), de-identified, written, and the
pixel data element is copied from the source bytes as they are — pydicom would write those same bytes (the
profile never changes pixel data).  Only the common layout is taken that way: a Pixel Data element that is
the last element of the file but for Data Set Trailing Padding (which the profile removes), of defined even
length in an uncompressed little endian transfer syntax or encapsulated (undefined length, ending with its
sequence delimiter) in a compressed one.  Anything else — other elements after the pixel data (digital
signatures, private groups 7FE1 and up, which the profile must see), float pixel data, big endian,
deflate — is read and written by pydicom as a whole.
"""

from __future__ import annotations

import io
import struct

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import tag_in_exception
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from mappings.deid.dicom import DeidOptions, Withheld, deidentify_dataset
from mappings.deid.keys import ProjectKeys
from mappings.dicom.rawread import read_header

_PIXEL_DATA = 0x7FE00010
_PADDING = 0xFFFCFFFC
_TAG_LEN = struct.Struct("<HHL").unpack_from
_EXPLICIT = struct.Struct("<HH2s2xL").unpack_from
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
#: transfer syntaxes :func:`_encode` writes (little endian, not deflated)
_PLAIN = frozenset(
    {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian}
    | {ts for ts in pydicom.uid.AllTransferSyntaxes if ts.is_compressed and ts.is_little_endian}
) - {pydicom.uid.DeflatedExplicitVRLittleEndian}
#: element headers as ``write_data_element`` writes them: implicit VR; explicit VR with a 4-byte length after
#: 2 reserved bytes (OB, OW, SQ, UN, UT, ...); explicit VR with a 2-byte length
_IMPLICIT_HEAD = struct.Struct("<HHL").pack
_LONG_HEAD = struct.Struct("<HH2s2xL").pack
_SHORT_HEAD = struct.Struct("<HH2sH").pack
_VR_BYTES = {str(vr): str(vr).encode() for vr in VR if len(str(vr)) == 2}
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)


def _element_head(tag: int, vr: str, length: int, implicit: bool) -> bytes | None:
    """The tag / VR / length header of an element whose value is ``length`` bytes, as pydicom writes it —
    None where this short form does not apply (unknown VR, too long for a 16-bit length)."""
    if implicit:
        return _IMPLICIT_HEAD(tag >> 16, tag & 0xFFFF, length)
    if vr in _LONG_VRS:
        return _LONG_HEAD(tag >> 16, tag & 0xFFFF, _VR_BYTES[vr], length)
    if vr in _VR_BYTES and length <= 0xFFFF:
        return _SHORT_HEAD(tag >> 16, tag & 0xFFFF, _VR_BYTES[vr], length)
    return None


#: VRs pydicom writes a ``str`` value of with write_string, write_text (encoded: ASCII in a plain character
#: set) or write_UI, and their padding to even length
_TEXT_PAD = {
    vr: b"\x00" if vr == "UI" else b" "
    for vr in ("AE", "AS", "CS", "DA", "DT", "TM", "UR", "UI", "LO", "LT", "SH", "ST", "UC", "UT")
}


def _padding_only(data: bytes, pos: int, implicit: bool) -> bool:
    """Whether ``data`` from ``pos`` on holds Data Set Trailing Padding (FFFC,FFFC) only: an element the
    profile removes under every option (Table E.1-1: X), so the pixel data is then the last element out."""
    while pos < len(data):
        if pos + 12 > len(data):
            return False
        if implicit:
            group, element, length = _TAG_LEN(data, pos)
            pos += 8
        else:
            group, element, vr, length = _EXPLICIT(data, pos)
            if vr != b"OB":
                return False
            pos += 12
        if (group << 16 | element) != _PADDING or length == 0xFFFFFFFF:
            return False
        pos += length
    return pos == len(data)


def pixel_tail(data: bytes, at: int, transfer_syntax: str) -> bytes | None:
    """The Pixel Data element at ``at`` as pydicom would write it back, when nothing but trailing padding
    follows it in ``data`` (see the module docstring); ``b""`` when ``at`` is the end (no pixel data); else
    None."""
    if at == len(data):
        return b""
    ts = UID(transfer_syntax)
    implicit = ts == pydicom.uid.ImplicitVRLittleEndian
    if at + 12 > len(data):
        return None
    if implicit:
        group, element, length = _TAG_LEN(data, at)
        pos = at + 8
    else:
        group, element, vr, length = _EXPLICIT(data, at)
        if vr not in (b"OB", b"OW"):
            return None
        pos = at + 12
    if (group << 16 | element) != _PIXEL_DATA:
        return None
    if length != 0xFFFFFFFF:
        end = pos + length
        if ts.is_compressed or length % 2 or end > len(data) or not _padding_only(data, end, implicit):
            return None
        return data[at:end]
    if not ts.is_compressed:
        return None
    while pos + 8 <= len(data):  # items up to the sequence delimiter (written back with a zero length)
        group, element, length = _TAG_LEN(data, pos)
        tag = group << 16 | element
        if tag == _SEQ_END:
            end = pos + 8
            return data[at:end] if length == 0 and _padding_only(data, end, implicit) else None
        if tag != _ITEM or length == 0xFFFFFFFF:
            return None
        pos += 8 + length
    return None


def _write(ds: Dataset) -> bytes:
    """``ds.save_as(enforce_file_format=True)``'s bytes: :func:`_encode` where it can, else pydicom."""
    out = _encode(ds)
    if out is not None:
        return out
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _encode(ds: Dataset) -> bytes | None:
    """What ``dcmwrite(enforce_file_format=True)`` writes for a little endian, not deflated data set that
    keeps its original encoding and character set, with its unconverted elements (pydicom's
    ``RawDataElement``, most of a de-identified header) written from their raw bytes directly, as
    ``write_data_element`` writes them; every other element is written by ``write_data_element``.  None for
    any other data set (pixel data included: :func:`pixel_tail` copies it)."""
    meta = getattr(ds, "file_meta", None)
    if not isinstance(meta, FileMetaDataset):
        return None
    ts = meta.get("TransferSyntaxUID")
    if ts is None or ts not in _PLAIN or "PixelData" in ds:
        return None
    implicit = ts == pydicom.uid.ImplicitVRLittleEndian
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    if (
        len(preamble) != 128
        or ds.original_encoding != (implicit, True)
        or ds.original_character_set != ds._character_set
        or any(tag >> 16 in (0, 2) for tag in ds._dict)
    ):
        return None
    # the file meta completed as dcmwrite completes its copy (in place: the caller owns ``ds``)
    file_meta = meta
    for meta_kw, ds_kw in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        have, want = file_meta.get(meta_kw), ds.get(ds_kw)
        if have is None or (want and want != have):
            setattr(file_meta, meta_kw, want)
    validate_file_meta(file_meta, enforce_standard=True)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    fp.write(preamble)
    fp.write(b"DICM")
    write_file_meta_info(fp, file_meta, enforce_standard=True)
    encodings = ds.get("SpecificCharacterSet", default_encoding)
    # ASCII text encodes to itself in these (pydicom's names for the default repertoire and ISO_IR 100)
    ascii_plain = convert_encodings(encodings) in (["iso8859"], ["latin_1"])
    write = fp.write
    for tag in sorted(ds.keys(), key=int):  # (int comparisons: the same order as BaseTag's)
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written
        elem = ds.get_item(tag)
        value = elem.value
        raw: bytes | None = None
        if isinstance(elem, RawDataElement) and type(value) is bytes and elem.length != 0xFFFFFFFF:
            raw = value
        elif isinstance(value, str) and ascii_plain and elem.VR in _TEXT_PAD and value.isascii():
            # a single text value the profile set or read, as write_string / write_text / write_UI encode it
            raw = value.encode()
            if len(raw) % 2:
                raw += _TEXT_PAD[elem.VR]
        if raw is not None and (head := _element_head(tag, elem.VR, len(raw), implicit)) is not None:
            write(head)
            write(raw)
            continue
        with tag_in_exception(tag):
            write_data_element(fp, elem, encodings)
    return bytes(fp.getvalue())


def deidentify_part10(
    data: bytes, keys: ProjectKeys, options: DeidOptions | None = None, *, patient_key: str | None = None
) -> bytes | Withheld:
    """The PS3.10 file ``data`` de-identified for ``keys``' project (see
    :func:`~mappings.deid.dicom.deidentify_dataset`), as PS3.10 bytes, or :class:`Withheld`."""
    head = read_header(data)
    if head is not None:
        ds, ts, at = head
        tail = pixel_tail(data, at, ts)
        if tail is not None:
            out = deidentify_dataset(ds, keys, options, patient_key=patient_key)
            if isinstance(out, Withheld):
                return out
            if max(map(int, out.keys()), default=0) < _PIXEL_DATA:
                return _write(out) + tail
    full = pydicom.dcmread(io.BytesIO(data))
    done = deidentify_dataset(full, keys, options, patient_key=patient_key)
    return done if isinstance(done, Withheld) else _write(done)


__all__ = ["deidentify_part10", "pixel_tail"]
