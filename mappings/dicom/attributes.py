"""DICOM dataset → index rows and DICOM JSON metadata (pure; PS3.18 Annex F for the JSON model).

The rows match the tables of ``gateway/store/dicom_schema.py``; the metadata JSON is what WADO-RS
``/metadata`` serves, with bulk data (PixelData and other large binary values) replaced by
``BulkDataURI`` placeholders that the server resolves to ``.../bulkdata/{tag}`` URLs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag

#: Placeholder in stored metadata; replaced by the instance's bulkdata base URL when served.
BULK_PREFIX = "bulk:"
#: Binary VRs are bulk data when larger than this (PixelData always).
BULK_THRESHOLD = 1024
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: sequences nested deeper than this are refused at STOW: nothing fedgate serves (DICOM JSON, rendering,
#: transcoding) must recurse without bound, and real instances stay far below (SR trees: ~10 levels)
MAX_SEQUENCE_DEPTH = 32

_UID_COMPONENT = re.compile(r"0|[1-9][0-9]*")


class InvalidInstance(ValueError):
    """The dataset lacks what a stored instance needs (the message names the attribute)."""


def _s(ds: Dataset | MetaView, keyword: str, limit: int | None = None) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple, MultiValue)) else str(value)
    text = text.strip()
    if not text:
        return None
    return text[:limit] if limit else text


def text(src: Dataset | MetaView, keyword: str) -> str:
    """``str(ds.<keyword>)`` of a single-valued string attribute, from the decoded metadata where it holds
    the value as text (same string: see :mod:`mappings.dicom.fastjson`), else from pydicom."""
    value = src.get(keyword)
    if isinstance(value, str):
        return value
    return str(getattr(src.ds if isinstance(src, MetaView) else src, keyword))


def _f(ds: Dataset | MetaView, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _i(ds: Dataset | MetaView, keyword: str) -> int | None:
    v = _f(ds, keyword)
    return int(v) if v is not None else None


def norm_name(name: str | None) -> str | None:
    """PN for matching: upper case, component separators as spaces, trailing separators dropped."""
    if not name:
        return None
    return " ".join(name.upper().replace("^", " ").replace("=", " ").split())


def dicom_patient_key(patient_id: str | None, issuer: str | None) -> str:
    """The stable common-model id of a patient known only from DICOM."""
    h = hashlib.sha256(f"{issuer or ''}|{patient_id or ''}".encode()).hexdigest()[:24]
    return f"dicom-{h}"


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a UID per DICOM PS3.5 §9.1 (None when it is one): at most 64 characters,
    components of digits separated by single periods, no component starting with 0 unless it is "0".
    Every UID that fedgate uses in a storage path or an index is checked with this on ingest, so no
    attribute value can change a path's meaning (".", "..", "/", NUL are not UIDs)."""
    if len(value) > 64:
        return f"is {len(value)} characters long; a UID has at most 64"
    for component in value.split("."):
        if not component:
            return "has an empty component (a UID is digits separated by single periods)"
        if not component.isascii() or not component.isdigit():
            return "holds characters other than digits and periods"
        if not _UID_COMPONENT.fullmatch(component):
            return f"has a component with a leading zero ({component[:16]!r})"
    return None


def check_uid(keyword: str, value: str | None) -> None:
    if not value:
        raise InvalidInstance(f"{keyword} is missing")
    why = uid_problem(value)
    if why is not None:
        raise InvalidInstance(f"{keyword} is not a valid DICOM UID (PS3.5 §9.1): it {why}")


def check_instance(ds: Dataset) -> None:
    for kw in REQUIRED:
        check_uid(kw, _s(ds, kw))


def sequence_depth(meta: dict[str, Any]) -> int:
    """How deep sequences nest in a DICOM JSON data set (0: no sequence), without recursion."""
    deepest, todo = 0, [(meta, 0)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SEQUENCE_DEPTH:
            break
        for attr in node.values():
            if isinstance(attr, dict) and attr.get("vr") == "SQ":
                todo.extend((item, depth + 1) for item in attr.get("Value") or () if isinstance(item, dict))
    return deepest


class MetaView:
    """Read-only ``get`` / ``in`` over the DICOM JSON metadata of a dataset, for :func:`index_rows` and
    :func:`_s` & co.: values come from the JSON (already decoded, no second pydicom conversion), except where
    the JSON does not hold pydicom's value as text — DS (the original string matters: ``"120"`` not
    ``120.0``), person names with several component groups, elements the strict encoding dropped — which
    are read from the dataset itself. ``index_rows(MetaView(meta, ds)) == index_rows(ds)`` (tested)."""

    def __init__(self, meta: dict[str, Any], ds: Dataset) -> None:
        self.meta, self.ds = meta, ds

    _keys: dict[str, tuple[str, int] | None] = {}  # keyword → (its DICOM JSON key, its tag), looked up once

    def get(self, keyword: str, default: Any = None) -> Any:
        found = self._keys.get(keyword, ())
        if found == ():
            tag = tag_for_keyword(keyword)
            found = self._keys[keyword] = (f"{tag:08X}", tag) if tag is not None else None
        if found is None:
            return self.ds.get(keyword, default)
        key, tag = found  # type: ignore[misc]
        entry = self.meta.get(key)
        if entry is None:
            # not in the data set: what pydicom answers too (an element the encoding dropped: pydicom's value)
            return self.ds.get(keyword, default) if tag in self.ds._dict else default
        vr = entry.get("vr")
        values = entry.get("Value")
        if vr == "DS":
            # the original strings (pydicom's str of each DSfloat: the value between the backslashes, stripped)
            # from the raw bytes; the JSON holds them as numbers ("120", not 120.0)
            raw = self.ds._dict.get(tag)  # type: ignore[call-overload]
            if values is None or type(raw) is not RawDataElement or type(raw.value) is not bytes:
                return self.ds.get(keyword, default)
            texts = [v.strip() for v in raw.value.decode("latin_1").strip().rstrip(" \x00").split("\\")]
            return texts[0] if len(texts) == 1 else texts
        if values is None:
            return "" if "InlineBinary" not in entry and "BulkDataURI" not in entry else self.ds.get(keyword, default)
        if vr == "PN":
            if any(set(v) != {"Alphabetic"} for v in values):
                return self.ds.get(keyword, default)
            values = [v["Alphabetic"] for v in values]
        elif vr == "SQ":
            return self.ds.get(keyword, default)
        return values[0] if len(values) == 1 else list(values)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.ds


def index_rows(
    ds: Dataset | MetaView, *, blob_path: str, size: int, transfer_syntax: str, now: float, patient_id: str | None
) -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]]:
    """(study, series, instance) rows for one stored instance (counts are filled by the store)."""
    study = {
        "study_uid": _s(ds, "StudyInstanceUID"),
        "patient_id": patient_id,
        "dicom_patient_id": _s(ds, "PatientID", 64),
        "issuer_of_patient_id": _s(ds, "IssuerOfPatientID", 64),
        "patient_name": _s(ds, "PatientName", 324),
        "patient_name_norm": norm_name(_s(ds, "PatientName", 324)),
        "patient_birth_date": _s(ds, "PatientBirthDate", 8),
        "patient_sex": _s(ds, "PatientSex", 16),
        "study_date": _s(ds, "StudyDate", 8),
        "study_time": _s(ds, "StudyTime", 16),
        "accession_number": _s(ds, "AccessionNumber", 64),
        "study_id": _s(ds, "StudyID", 16),
        "referring_physician": _s(ds, "ReferringPhysicianName", 324),
        "study_description": _s(ds, "StudyDescription", 255),
        "updated_ts": now,
    }
    series = {
        "series_uid": _s(ds, "SeriesInstanceUID"),
        "study_uid": study["study_uid"],
        "patient_id": patient_id,
        "modality": _s(ds, "Modality", 16),
        "series_number": _i(ds, "SeriesNumber"),
        "series_description": _s(ds, "SeriesDescription", 255),
        "body_part": _s(ds, "BodyPartExamined", 64),
        "manufacturer": _s(ds, "Manufacturer", 128),
        "model_name": _s(ds, "ManufacturerModelName", 128),
        "protocol_name": _s(ds, "ProtocolName", 128),
        "slice_thickness": _f(ds, "SliceThickness"),
        "convolution_kernel": _s(ds, "ConvolutionKernel", 64),
        "kvp": _f(ds, "KVP"),
        "pixel_spacing": _s(ds, "PixelSpacing", 64),
        "series_date": _s(ds, "SeriesDate", 8),
        "updated_ts": now,
    }
    instance = {
        "sop_uid": _s(ds, "SOPInstanceUID"),
        "series_uid": series["series_uid"],
        "study_uid": study["study_uid"],
        "patient_id": patient_id,
        "sop_class_uid": _s(ds, "SOPClassUID"),
        "instance_number": _i(ds, "InstanceNumber"),
        "transfer_syntax": transfer_syntax,
        "rows": _i(ds, "Rows"),
        "columns": _i(ds, "Columns"),
        "frames": _i(ds, "NumberOfFrames") or (1 if "Rows" in ds else None),
        "blob_path": blob_path,
        "size": size,
        "stored_ts": now,
    }
    return study, series, instance


#: control characters no indexed DICOM string may hold (PS3.5 §6.1.2.3: ESC for ISO 2022 code extensions,
#: and TAB/LF/CR of the text VRs are the only ones); NUL padding at the end is stripped before this check
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f]")
_COLUMN_KEYWORDS = {
    "dicom_patient_id": "PatientID",
    "patient_name": "PatientName",
    "referring_physician": "ReferringPhysicianName",
    "study_description": "StudyDescription",
    "series_description": "SeriesDescription",
    "accession_number": "AccessionNumber",
}


def control_character(rows: Iterable[dict[Any, Any]], content: Iterable[Iterable[dict[Any, Any]]] = ()) -> str | None:
    """A reason naming the first index value (or SR/SEG content value) holding a control character such as
    NUL, else None. Such a part is refused on both engines alike (PostgreSQL cannot store U+0000 in text;
    docs/dicomweb.md "Control characters")."""
    for row in [*rows, *(r for group in content for r in group)]:
        for col, value in row.items():
            if isinstance(value, str) and (m := CONTROL_RE.search(value)):
                name = _COLUMN_KEYWORDS.get(col, col)
                char = "NUL" if m.group(0) == "\x00" else f"U+{ord(m.group(0)):04X}"
                return f"{name} contains the control character {char}, which no DICOM string value may hold"
    return None


def bulk_handler(elem: DataElement) -> str:
    """BulkDataURI placeholder of a bulk element (a DataElement or a RawDataElement)."""
    return f"{BULK_PREFIX}{Tag(elem.tag):08X}"


def pixel_placeholder(ds: Dataset) -> dict[str, str]:
    """PixelData announced as bulk data when it was not read (stop_before_pixels)."""
    return {"vr": "OW" if (ds.get("BitsAllocated") or 8) > 8 else "OB", "BulkDataURI": f"{BULK_PREFIX}7FE00010"}


def metadata_json(ds: Dataset) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of the dataset, bulk data as ``BulkDataURI`` placeholders."""
    out = ds.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk_handler, suppress_invalid_tags=True
    )
    # pixel data that stop_before_pixels skipped is still announced as bulk data
    if "7FE00010" not in out and ds.get("Rows") is not None:
        out["7FE00010"] = pixel_placeholder(ds)
    return out


def resolve_bulk(meta: dict[str, Any], bulk_url: Callable[[str], str]) -> dict[str, Any]:
    """Replace bulk placeholders (recursively, in sequences too) by ``bulk_url(tag)`` (see
    :meth:`mappings.dicom.urls.DicomwebUrls.bulk_of`)."""
    for attr in meta.values():
        uri = attr.get("BulkDataURI")
        if uri and uri.startswith(BULK_PREFIX):
            attr["BulkDataURI"] = bulk_url(uri[len(BULK_PREFIX) :])
        for item in attr.get("Value", ()) if attr.get("vr") == "SQ" else ():
            if isinstance(item, dict):
                resolve_bulk(item, bulk_url)
    return meta
