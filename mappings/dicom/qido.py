"""QIDO-RS query parameters (PS3.18 §8.3.4, §10.6) → a parsed query; index rows → DICOM JSON.

The SQL over the DICOM index is built from a parsed query by ``gateway.store.qido``.

Matching (PS3.4 C.2.2.2 as applied by PS3.18 Table 10.6.1-5):
* UI: single value or a list (comma- or backslash-separated) — list matching;
* DA / TM: single value or range (``20200101-20201231``, ``-2020``, ``2020-``);
* PN: case-insensitive, ``*`` and ``?`` wildcards; ``fuzzymatching=true`` also matches any name component
  prefix (``jo`` matches ``Doe^John``);
* LO / SH (descriptions, ids, accession): case-insensitive, wildcards; CS: exact (wildcards allowed);
* IS / DS: exact numeric.
Unknown attributes and unsupported parameters → 400 (the error names the parameter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from mappings.dicom.urls import DicomwebUrls


class QidoError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Attr:
    keyword: str
    tag: str
    vr: str
    column: str  # of the level's index table (gateway.store.dicom_schema)
    level: str  # studies | series | instances


def _a(keyword: str, level: str, column: str) -> Attr:
    tag = f"{tag_for_keyword(keyword):08X}"
    return Attr(keyword, tag, dictionary_VR(tag), column, level)


ST, SE, IN = "studies", "series", "instances"
ATTRS = {
    a.keyword: a
    for a in (
        _a("StudyDate", ST, "study_date"),
        _a("StudyTime", ST, "study_time"),
        _a("AccessionNumber", ST, "accession_number"),
        _a("ReferringPhysicianName", ST, "referring_physician"),
        _a("PatientName", ST, "patient_name"),
        _a("PatientID", ST, "dicom_patient_id"),
        _a("IssuerOfPatientID", ST, "issuer_of_patient_id"),
        _a("PatientBirthDate", ST, "patient_birth_date"),
        _a("PatientSex", ST, "patient_sex"),
        _a("StudyInstanceUID", ST, "study_uid"),
        _a("StudyID", ST, "study_id"),
        _a("StudyDescription", ST, "study_description"),
        _a("ModalitiesInStudy", ST, "modalities"),
        _a("NumberOfStudyRelatedSeries", ST, "num_series"),
        _a("NumberOfStudyRelatedInstances", ST, "num_instances"),
        _a("Modality", SE, "modality"),
        _a("SeriesDescription", SE, "series_description"),
        _a("SeriesNumber", SE, "series_number"),
        _a("SeriesInstanceUID", SE, "series_uid"),
        _a("BodyPartExamined", SE, "body_part"),
        _a("Manufacturer", SE, "manufacturer"),
        _a("ManufacturerModelName", SE, "model_name"),
        _a("ProtocolName", SE, "protocol_name"),
        _a("SliceThickness", SE, "slice_thickness"),
        _a("SeriesDate", SE, "series_date"),
        _a("ConvolutionKernel", SE, "convolution_kernel"),
        _a("KVP", SE, "kvp"),
        _a("NumberOfSeriesRelatedInstances", SE, "num_instances"),
        _a("SOPClassUID", IN, "sop_class_uid"),
        _a("SOPInstanceUID", IN, "sop_uid"),
        _a("InstanceNumber", IN, "instance_number"),
        _a("Rows", IN, "rows"),
        _a("Columns", IN, "columns"),
        _a("NumberOfFrames", IN, "frames"),
    )
}
BY_TAG = {a.tag: a for a in ATTRS.values()}

#: Attributes returned by default per level (PS3.18 Tables 10.6.3-3/-4/-5).
DEFAULT = {
    "studies": [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    "series": [
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "BodyPartExamined",
        "Manufacturer",
        "ManufacturerModelName",
        "NumberOfSeriesRelatedInstances",
    ],
    "instances": ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"],
}
#: Which levels' attributes may be matched / returned when searching a level.
VISIBLE = {"studies": ("studies",), "series": ("studies", "series"), "instances": ("studies", "series", "instances")}
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
MAX_LIMIT = 1000
MAX_OFFSET = 2**63 - 1  # limit/offset: signed 64-bit in both databases


def resolve(name: str) -> Attr | str:
    """An indexed attribute, or the 8-hex tag of another DICOM attribute (includefield only)."""
    key = name.replace(",", "").replace("(", "").replace(")", "").strip()
    if key in ATTRS:
        return ATTRS[key]
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        key = key.upper()
        return BY_TAG.get(key, key)
    tag = tag_for_keyword(key)
    if tag is None:
        raise QidoError(name, "is not a DICOM attribute keyword or tag")
    return f"{tag:08X}"


def check_value(attr: Attr, value: str) -> None:
    """Raise :class:`QidoError` for a match value the attribute's VR cannot match (PS3.18 Table 10.6.1-5)."""
    vr = attr.vr
    if attr.keyword == "ModalitiesInStudy" or vr == "UI":
        return
    if vr in ("DA", "TM", "DT"):
        norm = value.replace(":", "") if vr == "TM" else value
        if "-" in norm:
            lo, _, hi = norm.partition("-")
            if not lo and not hi:
                raise QidoError(attr.keyword, "a range needs at least one end")
        elif vr == "DA" and not (len(norm) == 8 and norm.isdigit()):
            raise QidoError(attr.keyword, f"{value!r} is not a date (YYYYMMDD or a range)")
    elif vr in NUMERIC_VRS:
        try:
            float(value)
        except ValueError:
            raise QidoError(attr.keyword, f"{value!r} is not a number") from None


def like_pattern(value: str) -> str:
    """A QIDO wildcard value (``*``, ``?``) as a SQL LIKE pattern with ``\\`` as the escape character."""
    esc = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return esc.replace("*", "%").replace("?", "_")


NUMERIC_VRS = ("IS", "DS", "US", "UL", "FD", "FL")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f]")


@dataclass
class QidoQuery:
    base: str
    study_uid: str | None = None
    series_uid: str | None = None
    matches: list[tuple[Attr, str]] = field(default_factory=list)
    include: list[Attr | str] = field(default_factory=list)
    include_all: bool = False
    fuzzy: bool = False
    limit: int = 100
    offset: int = 0
    urls: DicomwebUrls = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.urls = DicomwebUrls(self.base)

    @classmethod
    def parse(
        cls,
        level: str,
        pairs: list[tuple[str, str]],
        *,
        base: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
        default_limit: int = 100,
    ) -> QidoQuery:
        q = cls(base, study_uid, series_uid, limit=default_limit)
        for name, value in pairs:
            if _CONTROL.search(name) or _CONTROL.search(value):  # NUL etc. (PS3.5 §6.1.2.3: ESC is the only one)
                raise QidoError(
                    name if not _CONTROL.search(name) else repr(name),
                    "contains a control character that no DICOM string value may hold",
                )
            if name == "limit" or name == "offset":
                try:
                    n = int(value)
                except ValueError:
                    raise QidoError(name, f"{value!r} is not an integer") from None
                if n < 0:
                    raise QidoError(name, "must be ≥ 0")
                if n > MAX_OFFSET:
                    raise QidoError(name, f"must be at most {MAX_OFFSET}")
                if name == "limit":
                    q.limit = min(n, MAX_LIMIT)
                else:
                    q.offset = n
            elif name == "fuzzymatching":
                if value not in ("true", "false"):
                    raise QidoError(name, "must be true or false")
                q.fuzzy = value == "true"
            elif name == "includefield":
                for item in value.split(","):
                    item = item.strip()
                    if item == "all":
                        q.include_all = True
                    elif item:
                        q.include.append(resolve(item))
            elif name.startswith("_") or name in ("format", "callback"):
                raise QidoError(name, "is not a supported QIDO-RS parameter")
            else:
                attr = resolve(name)
                if not isinstance(attr, Attr):
                    raise QidoError(name, "cannot be matched (not an indexed attribute; see docs/dicomweb.md)")
                if attr.level not in VISIBLE[level]:
                    raise QidoError(name, f"is not a {level} level attribute")
                q.matches.append((attr, value))
        for attr, value in q.matches:  # a value the attribute's VR cannot match (StudyDate=abc) is the request's
            check_value(attr, value)  # error (400), found here rather than while the query is built
        return q

    # ------------------------------------------------------------------------------- JSON
    def extra_tags(self, level: str) -> list[str]:
        return [
            i if isinstance(i, str) else i.tag
            for i in self.include
            if isinstance(i, str) or i.level not in VISIBLE[level]
        ]

    def render(self, level: str, row: dict[Any, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        names = [n for lv in VISIBLE[level] for n in DEFAULT[lv]]
        names += [i.keyword for i in self.include if isinstance(i, Attr) and i.level in VISIBLE[level]]
        for name in names:
            a = ATTRS[name]
            key = a.column if (a.level == level or level == "studies") else "st_" + a.column
            if a.level == "series" and level == "instances":
                key = a.column
            out[a.tag] = _element(a.vr, row.get(key))
        meta = row.get("_meta") or {}
        if self.include_all:
            for tag, attr in meta.items():
                if tag not in out and "BulkDataURI" not in attr and not tag.startswith("7FE0"):
                    out[tag] = attr
        for tag in self.extra_tags(level):
            if tag in meta:
                out[tag] = meta[tag]
        if level == "instances":
            out["00083002"] = _element("UI", row.get("transfer_syntax"))
        out["00081190"] = {"vr": "UR", "Value": [self.urls.of(level, row)]}
        return dict(sorted(out.items()))


def _element(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    if vr in ("IS", "US", "UL", "SS", "SL"):
        return {"vr": vr, "Value": [int(value)]}
    if vr in ("DS", "FD", "FL"):
        return {"vr": vr, "Value": [float(value)]}
    if vr == "CS" and isinstance(value, str) and "\\" in value:
        return {"vr": vr, "Value": value.split("\\")}
    return {"vr": vr, "Value": [value]}


__all__ = ["ATTRS", "Attr", "QidoError", "QidoQuery", "check_value", "keyword_for_tag", "like_pattern"]
