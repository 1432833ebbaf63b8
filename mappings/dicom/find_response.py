"""C-FIND response identifiers (PS3.4 C.4.1.2.3) encoded straight from QIDO-RS rows (DICOM JSON, PS3.18 F.2).

A response identifier holds every key of the request, in tag order, with the matched value or empty, and a
few values the SCP sets itself (Specific Character Set, Query/Retrieve Level, Retrieve AE Title, Instance
Availability). :class:`ResponseLayout` is made once per C-FIND from the request's keys; :meth:`encode` writes
one match as the data set bytes of a C-FIND-RSP in a little-endian transfer syntax (PS3.5 7.1), with values
as pydicom writes them after ``Dataset.from_json`` (text joined by backslash, padded to even length with a
space, UIDs with NUL; person names as their component groups joined by ``=``; text in UTF-8 under
``ISO_IR 192``). A match holding anything else (sequences, bulk data, decimal strings, tags of other VRs,
values of other types) is answered ``None``: the caller encodes that one with pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

#: the character set every response declares (0008,0005)
CHARSET = "ISO_IR 192"
#: VRs whose values are text in the declared character set (PS3.5 6.1.2.3)
TEXT = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN"})
#: VRs whose values are ASCII by definition (default character repertoire only)
ASCII = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
#: binary integer VRs and their struct codes (little endian)
INTS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
#: explicit VR: the VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2)
LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: VRs this module writes (text, integer strings, binary integers); other VRs are left to pydicom
PLAIN = TEXT | ASCII | frozenset(INTS) | {"IS"}


class ResponseLayout:
    """The response identifier of one C-FIND: ``keys`` are the request's (tag, VR) pairs (the request's own
    Specific Character Set excluded), ``constants`` the values the SCP answers itself by tag."""

    def __init__(
        self, keys: Iterable[tuple[int, str]], constants: dict[int, tuple[str, str]], *, implicit: bool
    ) -> None:
        slots: dict[int, tuple[str, str | None]] = {tag: (vr, None) for tag, vr in keys}
        slots[0x00080005] = ("CS", CHARSET)
        for tag, (vr, value) in constants.items():
            if tag in slots:
                slots[tag] = (vr, value)
        self.implicit = implicit
        #: (JSON key, tag bytes, the request's VR, constant or None) in tag order
        self.slots = [
            (f"{tag:08X}", struct.pack("<HH", tag >> 16, tag & 0xFFFF), vr, value)
            for tag, (vr, value) in sorted(slots.items())
        ]

    def encode(self, item: dict[str, Any]) -> bytes | None:
        """The data set of one match (``item``: a QIDO-RS JSON object), or ``None`` when it holds a value this
        module does not write."""
        out = bytearray()
        for key, tag, request_vr, constant in self.slots:
            vr = request_vr
            if constant is not None:
                raw: bytes | None = _text(vr, [constant])
            else:
                element = item.get(key)
                if element is None or "BulkDataURI" in element:  # (not matched, or bulk data: empty)
                    raw = b""
                else:
                    vr = element.get("vr", request_vr)
                    if "InlineBinary" in element or vr not in PLAIN:
                        return None
                    values = element.get("Value")
                    raw = _value(vr, values) if values else b""
            if raw is None or vr not in PLAIN:
                return None
            out += tag
            if self.implicit:
                out += struct.pack("<I", len(raw))
            elif vr in LONG:
                out += vr.encode() + b"\0\0" + struct.pack("<I", len(raw))
            elif len(raw) > 0xFFFF:
                return None
            else:
                out += vr.encode() + struct.pack("<H", len(raw))
            out += raw
        return bytes(out)


def _value(vr: str, values: list[Any]) -> bytes | None:
    if vr in INTS:
        if not all(type(v) is int for v in values):
            return None
        try:
            return struct.pack(f"<{len(values)}{INTS[vr]}", *values)
        except struct.error:  # out of the VR's range
            return None
    if vr == "IS":
        if not all(type(v) is int for v in values):
            return None
        return _text(vr, [str(v) for v in values])
    if vr == "PN":
        names = []
        for v in values:
            name = _person_name(v) if isinstance(v, dict) else None
            if name is None:
                return None
            names.append(name)
        return _text(vr, names)
    if not all(isinstance(v, str) for v in values):
        return None
    return _text(vr, values)


def _person_name(value: dict[str, Any]) -> str | None:
    """A DICOM JSON person name as its component groups (PS3.18 F.2.2), as pydicom reads it."""
    groups = ["", "", ""] if "Phonetic" in value else ["", ""] if "Ideographic" in value else [""]
    for i, name in enumerate(("Alphabetic", "Ideographic", "Phonetic")):
        if name in value:
            if not isinstance(value[name], str) or "=" in value[name]:
                return None
            groups[i] = value[name]
    return "=".join(groups).rstrip("=")  # (trailing empty groups are not written)


def _text(vr: str, values: list[str]) -> bytes | None:
    text = "\\".join(values)
    if vr in ASCII:
        if not text.isascii():
            return None
        raw = text.encode("ascii")
    else:
        raw = text.encode("utf-8")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


__all__ = ["CHARSET", "ResponseLayout"]
