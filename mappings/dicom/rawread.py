"""A fast reader for the header of a DICOM file held in memory — the common layout only.

STOW-RS reads the header of every received instance (up to the pixel data) to index it and to encode
its DICOM JSON metadata. ``pydicom.dcmread(..., stop_before_pixels=True)`` spends most of its time
in its general file machinery (a generator per data set, file position calls,
configurable hooks, heuristics for malformed files). :func:`read_header` walks the bytes of a well-formed
Part 10 file of the common layout with ``struct.unpack_from`` and builds **the same data set** that
``dcmread(BytesIO(data), stop_before_pixels=True)`` builds: a :class:`~pydicom.dataset.FileDataset` of
``RawDataElement`` values (not converted), sequences of undefined length read into ``Sequence`` items as
pydicom reads them, the same file meta, the same character set bookkeeping. Values are not deferred
(they are in memory already). Checked against ``dcmread`` element by element by
``tests/unit/dicom/test_rawread.py`` (demo files, pydicom's test files, synthetic CT, SR and SEG).

It takes only what it can read exactly: a 128-byte preamble and ``DICM``, an explicit VR little endian
file meta group, a data set in implicit or explicit VR little endian (the latter also for the compressed
transfer syntaxes), known VRs, sequences of undefined length as pydicom finds them. Anything else — big
endian, deflate, private transfer syntaxes, an unknown VR, a data set whose first element contradicts
its transfer syntax, a command set, a file cut short (or a header that does not end inside the buffer),
odd delimiters — returns ``None``, and the caller reads the file with pydicom exactly as before, so exotic
input costs time, never correctness (or a different error).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import pydicom.uid
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import ENCODED_VR
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

_HEAD = struct.Struct("<HH2sH").unpack_from
_ITEM = struct.Struct("<HHL").unpack_from
_LEN32 = struct.Struct("<L").unpack_from
#: the VRs pydicom reads as explicit (its ``ENCODED_VR``), by their two bytes
_VRS = {vr: vr.decode(default_encoding) for vr in ENCODED_VR}
_LONG = {str(v) for v in EXPLICIT_VR_LENGTH_32}
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # pydicom's stop_before_pixels
_ITEM_TAG, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET = 0x00080005
#: transfer syntaxes whose data set pydicom does not read as (explicit or implicit VR) little endian as is
_NOT_LITTLE_ENDIAN = {
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    *pydicom.uid.PrivateTransferSyntaxes,
}


class _Decline(Exception):
    """Not the common layout: pydicom reads this file."""


def _elements(
    data: bytes,
    pos: int,
    end: int | None,
    encoding: Any,
    *,
    top: bool,
    implicit: bool = False,
    meta: bool = False,
    item_end: bool = False,
) -> tuple[dict[Any, Any], int, Any]:
    """Read little endian elements from ``pos``; returns (raw elements by tag, position after them, the
    encoding of their character set). ``end``: a defined length's end (``None``: up to an item delimiter
    when ``item_end``, else to the end of ``data``). ``top``: stop before the pixel data; ``meta``: stop at
    the first element that is not of group 0002; ``implicit``: implicit VR (raw elements without a VR)."""
    raw: dict[Any, Any] = {}
    size = len(data)
    stop = size if end is None else end
    if stop > size:
        raise _Decline
    first = True
    while pos < stop:
        if pos + 8 > size:
            raise _Decline
        if implicit:
            group, elem, length = _ITEM(data, pos)
            vr = None
            header = 8
        else:
            group, elem, vrb, length = _HEAD(data, pos)
        tag = group << 16 | elem
        if meta and group != 2:
            break
        if tag == _ITEM_END:
            if not item_end or end is not None:
                raise _Decline
            return raw, pos + 8, encoding
        if first:
            first = False
            if top and not meta and group in (0, 2):
                raise _Decline  # a command set, or file meta elements in the data set
            if top and implicit and 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B:
                raise _Decline  # looks explicit: pydicom's heuristics switch the encoding
        if not implicit:
            vr = _VRS.get(vrb)
            if vr is None:
                raise _Decline  # an unknown VR, or implicit VR (pydicom's heuristics take over)
            header = 8
            if vr in _LONG:
                if pos + 12 > size:
                    raise _Decline
                length = _LEN32(data, pos + 8)[0]
                header = 12
        if top and tag in _PIXEL_TAGS:
            return raw, pos, encoding
        at = pos + header
        key = BaseTag(tag)
        if length == 0xFFFFFFFF:
            if implicit:  # as pydicom: the dictionary's VR, else items ahead make it a sequence
                try:
                    vr = _dictionary_vr_fast(tag)
                except KeyError:
                    if at + 4 <= size and _ITEM(data, at)[:2] == (0xFFFE, 0xE000):
                        vr = "SQ"
            if vr != "SQ":
                raise _Decline  # undefined length other than a sequence (UN: pydicom's settings decide)
            seq, pos = _sequence(data, at, encoding, implicit)
            raw[key] = DataElement(key, vr, seq, at, is_undefined_length=True)
            continue
        pos = at + length
        if pos > stop:
            raise _Decline  # cut short (or the buffer ends inside the header)
        value = data[at:pos] if length else empty_value_for_VR(vr, raw=True)
        if tag == _CHARSET:
            encoding = convert_encodings(convert_string(value or b"", True))  # type: ignore[arg-type]
        raw[key] = RawDataElement(key, vr, length, value, at, implicit, True)  # type: ignore[arg-type]
    if end is None and item_end:
        raise _Decline  # no item delimiter
    if pos != stop and not meta:
        raise _Decline
    return raw, pos, encoding


def _dataset(raw: dict[Any, Any], parent_encoding: Any, encoding: Any, implicit: bool) -> Dataset:
    ds = Dataset(raw, parent_encoding=parent_encoding)
    ds.set_original_encoding(implicit, True, encoding)
    return ds


def _sequence(data: bytes, pos: int, encoding: Any, implicit: bool) -> tuple[Sequence, int]:
    """An undefined length sequence's items (as ``pydicom.filereader.read_sequence``)."""
    items = []
    size = len(data)
    while True:
        if pos + 8 > size:
            raise _Decline
        group, elem, length = _ITEM(data, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            pos += 8
            break
        if tag != _ITEM_TAG:
            raise _Decline
        item_at = pos
        pos += 8
        if length == 0xFFFFFFFF:
            raw, pos, enc = _elements(data, pos, None, encoding, top=False, implicit=implicit, item_end=True)
        else:
            raw, pos, enc = _elements(data, pos, pos + length, encoding, top=False, implicit=implicit)
        ds = _dataset(raw, encoding, enc, implicit)
        ds.is_undefined_length_sequence_item = length == 0xFFFFFFFF
        ds.seq_item_tell = item_at
        ds.file_tell = item_at
        items.append(ds)
    seq = Sequence(items)
    seq.is_undefined_length = True
    return seq, pos


def read_header(data: bytes) -> tuple[FileDataset, str, int] | None:
    """(the data set as ``dcmread(BytesIO(data), stop_before_pixels=True)`` reads it, its transfer syntax
    UID, the offset of the pixel data element — ``len(data)`` when there is none), or ``None`` when the
    bytes are not of the layout this reader takes (see the module docstring)."""
    if len(data) < 132 + 12 or data[128:132] != b"DICM":
        return None
    try:
        meta_raw, pos, _ = _elements(data, 132, None, default_encoding, top=True, meta=True)
        if 0x00020010 not in meta_raw or pos >= len(data):
            return None
        # as pydicom's _read_file_meta_info and read_partial: the first element, the group length and the
        # transfer syntax are converted while reading
        file_meta = FileMetaDataset(meta_raw)  # (pydicom wraps a Dataset of them: the same elements)
        file_meta.set_original_encoding(
            is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding
        )
        _ = file_meta[next(iter(meta_raw))]
        if 0x00020000 in meta_raw:
            _ = file_meta.FileMetaInformationGroupLength
        ts = file_meta.get("TransferSyntaxUID")
        if not ts or ts in _NOT_LITTLE_ENDIAN:
            return None
        implicit = ts == pydicom.uid.ImplicitVRLittleEndian
        raw, pixel_at, encoding = _elements(data, pos, None, default_encoding, top=True, implicit=implicit)
    except (_Decline, struct.error, UnicodeDecodeError, ValueError, LookupError, TypeError):
        return None
    # pydicom builds a Dataset of the elements, then a FileDataset around the same element dict, whose
    # character set it reads through the first (converting (0008,0005)): the FileDataset alone ends the same
    ds = FileDataset(io.BytesIO(data), raw, data[:128], file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, ds._character_set)
    return ds, str(ts), pixel_at
