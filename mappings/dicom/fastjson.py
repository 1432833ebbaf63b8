"""DICOM JSON (PS3.18 Annex F.2) straight from the raw elements of a freshly read dataset.

STOW-RS stores the DICOM JSON metadata of every instance (WADO-RS ``/metadata`` serves it without
reading the file).  pydicom's ``Dataset.to_json_dict`` converts every raw element into a
``DataElement`` (value classes, validation, multi-value wrappers), most of the parse cost of a CT
instance.  :func:`dataset_json` decodes the common cases itself — little-endian elements of the
string, number, tag and binary VRs, sequences of such items, in the default / ISO_IR 100 / ISO_IR 192
character sets — and produces **the same dictionary** as ``to_json_dict(bulk_data_threshold,
bulk_data_element_handler, suppress_invalid_tags=True)`` on the same freshly read dataset (checked by
``tests/unit/dicom/test_fastjson.py`` against pydicom on the demo files, synthetic CT, SR and SEG, and
on a table of odd values).  That includes pydicom's strict-mode validation: a value pydicom would
reject (and so drop from the output) is never taken by the fast path.  Whenever a case is not covered
(implicit VR of a private or ambiguous tag, UN, code extensions, deferred text values, a value that
fails validation, ...) that one top-level element is handed to pydicom, so exotic input costs time,
never correctness.
"""

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import Callable
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.tag import BaseTag
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

_RAISE = config.RAISE
_NUMBERS = {
    "US": ("H", 2, int),
    "SS": ("h", 2, int),
    "UL": ("L", 4, int),
    "SL": ("l", 4, int),
    "UV": ("Q", 8, int),
    "SV": ("q", 8, int),
    "FL": ("f", 4, float),
    "FD": ("d", 8, float),
}
_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW"}
_TEXT = {"LO", "SH", "UC", "PN", "LT", "ST", "UT"}  # decoded with the dataset's character set
_SINGLE_TEXT = {"LT", "ST", "UT"}
_MULTI_STRING = {"CS", "AS", "DA", "TM", "DT", "IS"}  # pydicom's multi_string(decoded)
_LUT_DESCRIPTORS = {0x00281101, 0x00281102, 0x00281103, 0x00283002}
_CHARSET_TAG = 0x00080005
_CODECS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


class _Doubt(Exception):
    """This element is not one the fast path handles exactly: let pydicom encode it."""


BulkHandler = Callable[[Any], str]


def _charset(ds: Dataset, inherited: str | None) -> str | None:
    """The Python codec for the text VRs of ``ds`` (None: a character set the fast path leaves alone)."""
    raw = ds._dict.get(_CHARSET_TAG)  # type: ignore[call-overload]
    if raw is None:
        return inherited
    if isinstance(raw, DataElement):  # pydicom converts it while reading
        value = raw.value
        names = [value] if isinstance(value, str) else list(value or [""])
        names = [n.strip() if isinstance(n, str) else None for n in names] or [""]
    elif raw.value is None:
        return None
    else:
        names = [n.strip() for n in raw.value.decode("latin_1").rstrip(" \x00").split("\\")]
    if len(names) != 1:
        return None
    return _CODECS.get(names[0])


def _vr_of(tag: BaseTag, raw: RawDataElement) -> str:
    vr = raw.VR
    if vr is None:  # implicit VR: public, unambiguous tags only
        if tag.is_private or (tag & 0xFFFF) == 0:
            raise _Doubt
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise _Doubt from None
    if (
        vr not in _NUMBERS
        and vr not in _BINARY
        and vr not in _TEXT
        and vr not in _MULTI_STRING
        and vr not in ("AT", "UI", "AE", "UR", "DS", "SQ")
    ):
        raise _Doubt  # UN, ambiguous VRs ("US or SS", ...)
    return vr


#: pydicom's verdict on (VR, value) pairs seen before: its validation (regular expressions, lengths) was a
#: third of the encoding, and most values repeat from instance to instance (dates, names, series and study
#: UIDs, window settings, ...). Bounded: cleared when full.
_VALID: dict[tuple[str, str], bool] = {}
_VALID_MAX = 20_000


def _check(vr: str, value: str) -> None:
    key = (vr, value)
    ok = _VALID.get(key)
    if ok is None:
        try:
            validate_value(vr, value, _RAISE)
            ok = True
        except ValueError:
            ok = False
        if len(_VALID) >= _VALID_MAX:
            _VALID.clear()
        _VALID[key] = ok
    if not ok:
        raise _Doubt


def _strings(vr: str, data: bytes, codec: str | None) -> list[str]:
    if vr in _TEXT:
        if codec is None or b"\x1b" in data:
            raise _Doubt
        if vr == "PN":
            data = data.rstrip(b"\x00 ")
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            raise _Doubt from None
        if vr in _SINGLE_TEXT:
            _check(vr, text)
            return [text.rstrip("\0 ")]
        items = text.split("\\")
        if vr != "PN":
            for v in items:
                _check(vr, v)
            return [v.rstrip("\0 ") for v in items]
        return items
    text = data.decode("latin_1")
    if vr in _MULTI_STRING:
        return text.rstrip(" \x00").split("\\")
    if vr == "DS":
        return text.strip().rstrip(" \x00").split("\\")
    if vr == "UI":
        return text.rstrip("\0 ").rstrip(" \x00").split("\\")
    if vr == "AE":
        return [v.strip() for v in text.split("\\")]
    return [text.rstrip()]  # UR


def _string_value(vr: str, items: list[str]) -> list[Any] | None:
    """The JSON "Value" of a string VR (None: empty), validated like pydicom's strict reading."""
    if len(items) == 1:
        v = items[0]
        if v == "" or (vr in ("IS", "DS") and v.strip() == ""):
            if v != "":
                raise _Doubt  # whitespace-only IS/DS: pydicom keeps the string, then fails on it
            return None
    elif any(v == "" or v.strip() == "" for v in items):
        raise _Doubt
    if vr == "PN":
        out = []
        for v in items:
            if "=" in v:
                raise _Doubt
            _check("PN", v)
            out.append({"Alphabetic": v})
        return out
    if vr == "IS":
        nums = []
        for v in items:
            _check("IS", v)
            n = int(v)
            if not -(2**31) <= n < 2**31:
                raise _Doubt
            nums.append(n)
        return nums
    if vr == "DS":
        nums = []
        for v in items:
            _check("DS", v)
            _check("DS", v.strip())
            nums.append(float(v))  # type: ignore[arg-type]
        return nums
    if vr not in _TEXT:
        for v in items:
            _check(vr, v)
    return items


#: encoded raw elements seen before, by everything their encoding depends on (tag, VR, value bytes, character
#: set, bulk data rule): the header of a series repeats from instance to instance (patient, study, series,
#: equipment and acquisition attributes: ≈ 45 of a CT instance's 56 elements), so most elements of a STOW
#: instance are a dictionary look-up instead of a decode, a validation and a conversion (the encoding was a
#: third of the parse). The dictionaries handed out are shared between data sets: read-only for callers.
#: Bounded: cleared when full, like :data:`_VALID`.
_SEEN: dict[tuple[Any, ...], dict[Any, Any]] = {}
_SEEN_MAX = 20_000
#: values longer than this are not memoised (text blobs, large arrays: rarely repeated, costly to hash)
_SEEN_BYTES = 256
#: elements that differ in every instance (SOP Instance UIDs, instance number, position, time and date of
#: the image): memoising them would only churn the memo
_PER_INSTANCE = frozenset(
    {
        0x00020003,
        0x00080018,
        0x00080012,
        0x00080013,
        0x00080032,
        0x00080033,
        0x00200013,
        0x00200032,
        0x00201041,
        0x00280106,
        0x00280107,
    }
)
_DOUBTFUL: dict[Any, Any] = {}  # memo value of an element the fast path leaves to pydicom


def _element(tag: BaseTag, elem: Any, codec: str | None, handler: BulkHandler, limit: int) -> dict[Any, Any]:
    data = elem.value
    number = tag + 0  # a plain int (BaseTag compares in Python: slow as a dictionary key)
    if type(data) is not bytes or len(data) > _SEEN_BYTES or number in _PER_INSTANCE or isinstance(elem, DataElement):
        return _encode(tag, elem, codec, handler, limit)
    key = (number, elem.VR, data, codec, elem.is_little_endian, handler, limit)
    got = _SEEN.get(key)
    if got is None:
        try:
            got = _encode(tag, elem, codec, handler, limit)
        except _Doubt:
            got = _DOUBTFUL
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[key] = got
    if got is _DOUBTFUL:
        raise _Doubt
    return got


def _encode(tag: BaseTag, elem: Any, codec: str | None, handler: BulkHandler, limit: int) -> dict[Any, Any]:
    if isinstance(elem, DataElement):
        if elem.VR != "SQ":
            raise _Doubt  # converted already (by someone's access): pydicom's own view of it
        return {"vr": "SQ", "Value": [_dataset(item, codec, handler, limit) for item in elem.value]}
    if not elem.is_little_endian:
        raise _Doubt
    vr = _vr_of(tag, elem)
    data = elem.value
    if vr in _BINARY:
        length = len(data) if data is not None else elem.length
        if length == 0xFFFFFFFF:
            raise _Doubt
        if length == 0:
            return {"vr": vr}
        if length > limit:
            return {"vr": vr, "BulkDataURI": handler(elem)}
        if data is None:
            raise _Doubt
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode()}
    if data is None or vr == "SQ":
        raise _Doubt  # deferred value, or a raw sequence
    if vr in _NUMBERS:
        if tag in _LUT_DESCRIPTORS:
            raise _Doubt
        fmt, size, kind = _NUMBERS[vr]
        if len(data) % size:
            raise _Doubt
        if not data:
            return {"vr": vr}
        return {"vr": vr, "Value": [kind(v) for v in struct.unpack(f"<{len(data) // size}{fmt}", data)]}
    if vr == "AT":
        if len(data) % 4:
            raise _Doubt
        if not data:
            return {"vr": vr}
        pairs = struct.unpack(f"<{len(data) // 2}H", data)
        return {"vr": vr, "Value": [f"{pairs[i] << 16 | pairs[i + 1]:08X}" for i in range(0, len(pairs), 2)]}
    value = _string_value(vr, _strings(vr, data, codec))
    return {"vr": vr} if value is None else {"vr": vr, "Value": value}


def _dataset(ds: Any, codec: str | None, handler: BulkHandler, limit: int) -> dict[Any, Any]:
    """A sequence item: any doubt anywhere inside makes the whole top-level element pydicom's."""
    if not isinstance(ds, Dataset):
        raise _Doubt
    codec = _charset(ds, codec) if _CHARSET_TAG in ds._dict else codec
    return {f"{tag:08X}": _element(tag, elem, codec, handler, limit) for tag, elem in ds._dict.items()}


def dataset_json(ds: Dataset, *, bulk_data_threshold: int, bulk_data_element_handler: BulkHandler) -> dict[Any, Any]:
    """``ds.to_json_dict(bulk_data_threshold, bulk_data_element_handler, suppress_invalid_tags=True)``,
    computed without converting the raw elements where that is safe (see the module docstring)."""
    if config.datetime_conversion or config.use_DS_numpy or config.use_IS_numpy or config.use_DS_decimal:
        return ds.to_json_dict(
            bulk_data_threshold=bulk_data_threshold,
            bulk_data_element_handler=bulk_data_element_handler,
            suppress_invalid_tags=True,
        )
    codec = _charset(ds, "latin_1")
    limit = (bulk_data_threshold // 4) * 3  # pydicom's rule: base64 grows by a third
    out: dict[str, dict[Any, Any]] = {}
    for tag in list(ds._dict):
        try:
            out[f"{tag:08X}"] = _element(tag, ds._dict[tag], codec, bulk_data_element_handler, limit)
        except _Doubt:
            fallback = _pydicom_element(ds, tag, bulk_data_element_handler, bulk_data_threshold)
            if fallback is not None:
                out[f"{tag:08X}"] = fallback
    return out


def _pydicom_element(ds: Dataset, tag: BaseTag, handler: BulkHandler, threshold: int) -> dict[Any, Any] | None:
    """pydicom's encoding of one element, dropped (as ``suppress_invalid_tags`` does) when it fails.
    (0008,0005), which pydicom converts while reading (so the fast path leaves it to pydicom), is memoised
    by its value: one per character set, not one pydicom encoding per instance."""
    elem = ds._dict[tag]
    if tag == _CHARSET_TAG and isinstance(elem, DataElement) and elem.VR == "CS":
        value = elem.value
        key = (_CHARSET_TAG, value) if isinstance(value, str) or value is None else (_CHARSET_TAG, *value)
        got = _SEEN.get(key, _DOUBTFUL)
        if got is _DOUBTFUL:
            got = _SEEN[key] = _pydicom_encoding(ds, tag, handler, threshold)  # type: ignore[assignment]
        return got
    return _pydicom_encoding(ds, tag, handler, threshold)


def _pydicom_encoding(ds: Dataset, tag: BaseTag, handler: BulkHandler, threshold: int) -> dict[Any, Any] | None:
    with config.strict_reading():
        try:
            return ds[tag].to_json_dict(bulk_data_element_handler=handler, bulk_data_threshold=threshold)
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            OverflowError,
            BytesLengthException,
            struct.error,
            OSError,
        ) as exc:  # what pydicom raises on a bad value
            log.warning("DICOM JSON: element %08X dropped: %s", tag, type(exc).__name__)
            return None
