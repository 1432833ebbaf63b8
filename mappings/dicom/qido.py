"""QIDO-RS query parameters (PS3.18 §8.3.4, §10.6) → SQL over the DICOM index, rows → DICOM JSON.

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
from sqlalchemy import and_, exists, func, or_, select

from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_study
from mappings.dicom.attributes import norm_name


class QidoError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Attr:
    keyword: str
    tag: str
    vr: str
    table: Any
    column: str
    level: str  # studies | series | instances


def _a(keyword: str, table, column: str, level: str) -> Attr:
    tag = f"{tag_for_keyword(keyword):08X}"
    return Attr(keyword, tag, dictionary_VR(tag), table, column, level)


ST, SE, IN = dcm_study, dcm_series, dcm_instance
ATTRS = {a.keyword: a for a in (
    _a("StudyDate", ST, "study_date", "studies"), _a("StudyTime", ST, "study_time", "studies"),
    _a("AccessionNumber", ST, "accession_number", "studies"),
    _a("ReferringPhysicianName", ST, "referring_physician", "studies"),
    _a("PatientName", ST, "patient_name", "studies"), _a("PatientID", ST, "dicom_patient_id", "studies"),
    _a("IssuerOfPatientID", ST, "issuer_of_patient_id", "studies"),
    _a("PatientBirthDate", ST, "patient_birth_date", "studies"), _a("PatientSex", ST, "patient_sex", "studies"),
    _a("StudyInstanceUID", ST, "study_uid", "studies"), _a("StudyID", ST, "study_id", "studies"),
    _a("StudyDescription", ST, "study_description", "studies"),
    _a("ModalitiesInStudy", ST, "modalities", "studies"),
    _a("NumberOfStudyRelatedSeries", ST, "num_series", "studies"),
    _a("NumberOfStudyRelatedInstances", ST, "num_instances", "studies"),
    _a("Modality", SE, "modality", "series"), _a("SeriesDescription", SE, "series_description", "series"),
    _a("SeriesNumber", SE, "series_number", "series"), _a("SeriesInstanceUID", SE, "series_uid", "series"),
    _a("BodyPartExamined", SE, "body_part", "series"), _a("Manufacturer", SE, "manufacturer", "series"),
    _a("ManufacturerModelName", SE, "model_name", "series"), _a("ProtocolName", SE, "protocol_name", "series"),
    _a("SliceThickness", SE, "slice_thickness", "series"), _a("SeriesDate", SE, "series_date", "series"),
    _a("ConvolutionKernel", SE, "convolution_kernel", "series"), _a("KVP", SE, "kvp", "series"),
    _a("NumberOfSeriesRelatedInstances", SE, "num_instances", "series"),
    _a("SOPClassUID", IN, "sop_class_uid", "instances"), _a("SOPInstanceUID", IN, "sop_uid", "instances"),
    _a("InstanceNumber", IN, "instance_number", "instances"), _a("Rows", IN, "rows", "instances"),
    _a("Columns", IN, "columns", "instances"), _a("NumberOfFrames", IN, "frames", "instances"),
)}
BY_TAG = {a.tag: a for a in ATTRS.values()}

#: Attributes returned by default per level (PS3.18 Tables 10.6.3-3/-4/-5).
DEFAULT = {
    "studies": ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
    "series": ["Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "BodyPartExamined",
               "Manufacturer", "ManufacturerModelName", "NumberOfSeriesRelatedInstances"],
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


def _like(value: str) -> str:
    esc = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return esc.replace("*", "%").replace("?", "_")


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

    @classmethod
    def parse(cls, level: str, pairs: list[tuple[str, str]], *, base: str, study_uid: str | None = None,
              series_uid: str | None = None, default_limit: int = 100) -> "QidoQuery":
        q = cls(base, study_uid, series_uid, limit=default_limit)
        for name, value in pairs:
            if _CONTROL.search(name) or _CONTROL.search(value):  # NUL etc. (PS3.5 §6.1.2.3: ESC is the only one)
                raise QidoError(name if not _CONTROL.search(name) else repr(name),
                                "contains a control character that no DICOM string value may hold")
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
            q._predicate(attr, value)  # error (400), found here rather than while the query is built
        return q

    # ------------------------------------------------------------------------------- SQL
    def _predicate(self, attr: Attr, value: str, views: dict | None = None):
        v = views or {}
        st, se = v.get(ST, ST), v.get(SE, SE)
        col = v.get(attr.table, attr.table).c[attr.column]
        vr = attr.vr
        if attr.keyword == "ModalitiesInStudy":
            wanted = [v for v in value.replace("\\", ",").split(",") if v]
            if views:  # per-patient rows (see statements): that patient's series only
                return exists(select(se.c.series_uid).where(se.c.study_uid == st.c.study_uid, se.c.modality.in_(wanted),
                                                            se.c.patient_id.is_not_distinct_from(st.c.patient_id)))
            return exists(select(SE.c.series_uid).where(SE.c.study_uid == ST.c.study_uid, SE.c.modality.in_(wanted)))
        if vr == "UI":
            values = [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
            return col.in_(values)
        if vr in ("DA", "TM", "DT"):
            norm = value.replace(":", "") if vr == "TM" else value
            if "-" in norm:
                lo, _, hi = norm.partition("-")
                preds = []
                if lo:
                    preds.append(col >= lo)
                if hi:
                    preds.append(col <= (hi + "z" if vr == "TM" else hi))
                if not preds:
                    raise QidoError(attr.keyword, "a range needs at least one end")
                return and_(*preds)
            if vr == "DA" and not (len(norm) == 8 and norm.isdigit()):
                raise QidoError(attr.keyword, f"{value!r} is not a date (YYYYMMDD or a range)")
            return col.like(norm + "%") if vr == "TM" else col == norm
        if vr in ("IS", "DS", "US", "UL", "FD", "FL"):
            try:
                num = float(value)
            except ValueError:
                raise QidoError(attr.keyword, f"{value!r} is not a number") from None
            return col == num
        if vr == "PN":
            target = st.c.patient_name_norm if attr.keyword == "PatientName" else func.upper(col)
            norm = norm_name(value) or ""
            if self.fuzzy:
                pat = _like(norm.rstrip("*")) + "%"
                return or_(target.like(pat, escape="\\"), target.like("% " + pat, escape="\\"))
            if "*" in value or "?" in value:
                return target.like(_like(norm), escape="\\")
            return target == norm
        if vr in ("LO", "SH", "LT", "ST"):
            target = func.upper(col)
            if "*" in value or "?" in value:
                return target.like(_like(value.upper()), escape="\\")
            return target == value.upper()
        if "*" in value or "?" in value:
            return col.like(_like(value), escape="\\")
        return col == value

    def statements(self, level: str, scope, views: dict | None = None) -> tuple[Any, Any]:
        """(page, count) statements.  ``views``: ``{dcm_study: view, dcm_series: view}`` — per-patient rows
        for a research scope when conflicting studies are stored (``gateway.store.dicom_views``): every
        row, joined parent included, is one patient's."""
        if views:
            return self._view_statements(level, scope, views)
        if level == "studies":
            cols = [ST]
            frm = ST
            order = [ST.c.study_date, ST.c.study_uid]
            patient = ST.c.patient_id
        elif level == "series":
            cols = [SE, *[c.label("st_" + c.name) for c in ST.c]]
            frm = SE.join(ST, ST.c.study_uid == SE.c.study_uid)
            order = [SE.c.study_uid, SE.c.series_number, SE.c.series_uid]
            patient = SE.c.patient_id
        else:
            cols = [IN.c.sop_uid, IN.c.sop_class_uid, IN.c.instance_number, IN.c.rows, IN.c.columns, IN.c.frames,
                    IN.c.transfer_syntax, IN.c.patient_id,
                    *[c for c in SE.c if c.name not in ("patient_id", "updated_ts")],
                    *[c.label("st_" + c.name) for c in ST.c]]
            frm = IN.join(SE, SE.c.series_uid == IN.c.series_uid).join(ST, ST.c.study_uid == IN.c.study_uid)
            order = [IN.c.series_uid, IN.c.instance_number, IN.c.sop_uid]
            patient = IN.c.patient_id
        own = patient.table
        # consent gate: the level's own row carries its patient's profile number (no per-row patient subquery)
        where = [scope.row_clause(own.c.consent_no)]
        # the path's UIDs: every level's rows carry their study's (and instances their series') UID
        if self.study_uid:
            where.append(own.c.study_uid == self.study_uid)
        if self.series_uid:
            where.append((own if own is not ST else SE).c.series_uid == self.series_uid)
        where += [self._predicate(a, v) for a, v in self.matches]
        stmt = select(*cols).select_from(frm).where(*where).order_by(*order).limit(self.limit).offset(self.offset)
        # The total (X-Total-Count) needs the joins only for matches on a parent level's attributes: a
        # series or instance row exists only with its parent rows (inserted with them in the STOW index
        # transaction, never deleted apart), so counting the level's own table gives the same number —
        # a b-tree count ungated and a seek of the consent_no index gated, where the join made SQLite
        # read every row of the level (gated QIDO series 0.2 ms slower than ungated; issue #4).
        joins = {a.table for a, _ in self.matches} | ({SE} if self.series_uid and own is ST else set())
        count = select(func.count()).select_from(own if joins <= {own} else frm).where(*where)
        return stmt, count

    def _view_statements(self, level: str, scope, views: dict) -> tuple[Any, Any]:
        st, se = views[ST], views[SE]
        same_patient = st.c.patient_id.is_not_distinct_from
        if level == "studies":
            cols, frm, own = [st], st, st
            order = [st.c.study_date, st.c.study_uid, st.c.patient_id]
        elif level == "series":
            cols = [se, *[c.label("st_" + c.name) for c in st.c]]
            frm = se.join(st, and_(st.c.study_uid == se.c.study_uid, same_patient(se.c.patient_id)))
            own = se
            order = [se.c.study_uid, se.c.series_number, se.c.series_uid, se.c.patient_id]
        else:
            cols = [IN.c.sop_uid, IN.c.sop_class_uid, IN.c.instance_number, IN.c.rows, IN.c.columns, IN.c.frames,
                    IN.c.transfer_syntax, IN.c.patient_id,
                    *[c for c in se.c if c.name not in ("patient_id", "updated_ts", "consent_no")],
                    *[c.label("st_" + c.name) for c in st.c]]
            frm = IN.join(se, and_(se.c.series_uid == IN.c.series_uid, se.c.patient_id.is_not_distinct_from(IN.c.patient_id))) \
                .join(st, and_(st.c.study_uid == IN.c.study_uid, same_patient(IN.c.patient_id)))
            own = IN
            order = [IN.c.series_uid, IN.c.instance_number, IN.c.sop_uid]
        where = [scope.row_clause(own.c.consent_no)]
        if self.study_uid:
            where.append(own.c.study_uid == self.study_uid)
        if self.series_uid:
            where.append((own if own is not st else se).c.series_uid == self.series_uid)
        where += [self._predicate(a, v, views) for a, v in self.matches]
        stmt = select(*cols).select_from(frm).where(*where).order_by(*order).limit(self.limit).offset(self.offset)
        return stmt, select(func.count()).select_from(frm).where(*where)

    # ------------------------------------------------------------------------------- JSON
    def extra_tags(self, level: str) -> list[str]:
        return [i if isinstance(i, str) else i.tag for i in self.include
                if isinstance(i, str) or i.level not in VISIBLE[level]]

    def render(self, level: str, row: dict) -> dict[str, Any]:
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
        url = f"{self.base}/studies/{row['study_uid']}"
        if level in ("series", "instances"):
            url += f"/series/{row['series_uid']}"
        if level == "instances":
            url += f"/instances/{row['sop_uid']}"
        out["00081190"] = {"vr": "UR", "Value": [url]}
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


__all__ = ["ATTRS", "QidoError", "QidoQuery", "keyword_for_tag"]
