"""Transcoding between the uncompressed transfer syntaxes: implicit and explicit VR little
endian, explicit VR big endian and deflated explicit VR little endian, in every direction.

Pure (no I/O beyond the bytes given): ``gateway/handlers/dicomweb.py`` calls it off the event loop.
Compressed syntaxes (JPEG, JPEG 2000, RLE, …) are not handled here — decoding and encoding them is a
separate concern (see ``mappings/dicom/pixels.py``).

pydicom re-encodes every element whose value it decodes (numbers, text) when the byte order changes, but
writes binary values (OB, OW, OF, OL, OD, OV and native pixel data) as they are: a change of byte order
swaps the words of the word-typed ones here (PS3.5 §7.3: OW 16-bit, OF/OL 32-bit, OD/OV 64-bit words;
native pixel data by its BitsAllocated, as pydicom decodes it).
"""

from __future__ import annotations

import io

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: the syntaxes this module converts between (native pixel data; deflate compresses the whole data set)
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, BIG_ENDIAN})

_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TranscodeError(ValueError):
    """The instance cannot be re-encoded (the message says why, for people)."""


def little_endian(ts: str) -> bool:
    return ts != BIG_ENDIAN


def swap_words(ds: Dataset) -> None:
    """Swap the byte order of every word-typed binary value (sequences included, iteratively)."""
    todo = [ds]
    while todo:
        d = todo.pop()
        for elem in d:  # (iterating converts raw elements into data elements, with their VR resolved)
            vr = elem.VR
            if vr == "SQ":
                todo.extend(item for item in elem.value or ())
                continue
            if vr in ("OB or OW", "US or OW"):  # ambiguous VR read implicitly: OW when the words are 16-bit
                vr = "OW" if int(d.get("BitsAllocated") or 16) > 8 else "OB"
            width = _WORD.get(vr)
            if elem.tag == 0x7FE00010 and width:  # native pixel data: words of BitsAllocated bits (pydicom too)
                bits = int(d.get("BitsAllocated") or 16)
                width = bits // 8 if bits in (16, 32, 64) else width
            value = elem.value
            if width and isinstance(value, (bytes, bytearray)) and value and len(value) % width == 0:
                elem.value = np.frombuffer(value, dtype=f"u{width}").byteswap().tobytes()


def transcode_native(data: bytes | io.BufferedIOBase | str, target: str) -> bytes:
    """A Part 10 file (bytes, a binary file or a path) stored in one of :data:`NATIVE` re-encoded in
    another of them (Part 10 bytes)."""
    if target not in NATIVE:
        raise TranscodeError(f"{target} is not an uncompressed transfer syntax")
    ds = dcmread(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    stored = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if stored not in NATIVE:
        raise TranscodeError(
            f"the instance is stored as {stored or 'an unknown transfer syntax'}, which is not an uncompressed one"
        )
    if little_endian(stored) != little_endian(target):
        swap_words(ds)
    ds.file_meta.TransferSyntaxUID = target  # type: ignore[assignment]
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=target == IMPLICIT_LE, little_endian=little_endian(target), enforce_file_format=True)
    return buf.getvalue()


def native_pixels_le(ds: Dataset) -> bytes:
    """Native pixel data of a data set as little-endian bytes (big-endian words swapped)."""
    data = ds.PixelData
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    bits = int(ds.get("BitsAllocated") or 8)
    if ts == BIG_ENDIAN and bits > 8 and len(data) % (bits // 8) == 0:
        return np.frombuffer(data, dtype=f"u{bits // 8}").byteswap().tobytes()
    return bytes(data)
