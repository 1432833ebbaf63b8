"""QIDO-RS (PS3.18 §10.6) SQL over the DICOM index: a parsed :class:`mappings.dicom.qido.QidoQuery` →
(page, count) statements, always restricted by the caller's consent scope (its row clause)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, func, not_, or_, select

from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_study
from gateway.store.scope import AccessScope
from mappings.deid.dicom import BURNED_IN_SOP_CLASSES
from mappings.dicom.attributes import norm_name
from mappings.dicom.qido import NUMERIC_VRS, Attr, QidoError, QidoQuery, like_pattern

ST, SE, IN = dcm_study, dcm_series, dcm_instance
#: a QIDO level → its index table
TABLES = {"studies": ST, "series": SE, "instances": IN}
_KEY = {"studies": "study_uid", "series": "series_uid", "instances": "sop_uid"}
#: BurnedInAnnotation (0028,0301) in an instance's stored DICOM JSON (compact, as the index writes it)
_BURNED_IN = '%"00280301":{"vr":"CS","Value":["FLAG"]%'


def releasable(inst) -> Any:
    """SQL predicate on an instance table (or alias): the de-identification profile releases the
    instance — the test of :func:`mappings.deid.dicom.burned_in_reason` on the indexed SOP class and the
    stored BurnedInAnnotation (withheld when ``YES``, or for a SOP class that typically carries burned-in
    text unless ``NO``)."""
    meta = func.coalesce(inst.c.metadata, "")

    def flag(value: str) -> Any:
        return or_(meta.like(_BURNED_IN.replace("FLAG", value)), meta.like(_BURNED_IN.replace("FLAG", value.lower())))

    risky = func.coalesce(inst.c.sop_class_uid, "").in_(sorted(BURNED_IN_SOP_CLASSES))
    return not_(or_(flag("YES"), and_(risky, not_(flag("NO")))))


def _has_releasable(own, key: str, scope: AccessScope, same_patient: bool) -> Any:
    """A study / series row (``own``, ``key`` its UID column) with a visible instance the profile releases."""
    ri = dcm_instance.alias("ri")
    where = [ri.c[key] == own.c[key], scope.row_clause(ri.c.consent_no), releasable(ri)]
    if same_patient:
        where.append(ri.c.patient_id.is_not_distinct_from(own.c.patient_id))
    return exists(select(ri.c.sop_uid).where(*where))


def _predicate(q: QidoQuery, attr: Attr, value: str, views: dict | None = None):
    v = views or {}
    st, se = v.get(ST, ST), v.get(SE, SE)
    table = TABLES[attr.level]
    col = v.get(table, table).c[attr.column]
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
    if vr in NUMERIC_VRS:
        try:
            num = float(value)
        except ValueError:
            raise QidoError(attr.keyword, f"{value!r} is not a number") from None
        return col == num
    if vr == "PN":
        target = st.c.patient_name_norm if attr.keyword == "PatientName" else func.upper(col)
        norm = norm_name(value) or ""
        if q.fuzzy:
            pat = like_pattern(norm.rstrip("*")) + "%"
            return or_(target.like(pat, escape="\\"), target.like("% " + pat, escape="\\"))
        if "*" in value or "?" in value:
            return target.like(like_pattern(norm), escape="\\")
        return target == norm
    if vr in ("LO", "SH", "LT", "ST"):
        target = func.upper(col)
        if "*" in value or "?" in value:
            return target.like(like_pattern(value.upper()), escape="\\")
        return target == value.upper()
    if "*" in value or "?" in value:
        return col.like(like_pattern(value), escape="\\")
    return col == value

def statements(q: QidoQuery, level: str, scope: AccessScope, views: dict | None = None, *,
               releasable_only: bool = False) -> tuple[Any, Any]:
    """(page, count) statements.  ``scope`` is required (no scope, no query: an unrestricted scope is the
    gate's decision too).  ``views``: ``{dcm_study: view, dcm_series: view}`` — per-patient rows
    for a research scope when conflicting studies are stored (``gateway.store.dicom_views``): every
    row, joined parent included, is one patient's.  ``releasable_only`` (a de-identified answer): only
    instances the profile releases (:func:`releasable`), and studies / series with at least one, are
    matched and counted."""
    if not isinstance(scope, AccessScope):
        raise TypeError("qido statements: an AccessScope from the consent gate is required")
    if views:
        return _view_statements(q, level, scope, views, releasable_only)
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
    if q.study_uid:
        where.append(own.c.study_uid == q.study_uid)
    if q.series_uid:
        where.append((own if own is not ST else SE).c.series_uid == q.series_uid)
    where += [_predicate(q, a, v) for a, v in q.matches]
    if releasable_only:
        where.append(releasable(IN) if own is IN else _has_releasable(own, _KEY[level], scope, False))
    stmt = select(*cols).select_from(frm).where(*where).order_by(*order).limit(q.limit).offset(q.offset)
    # The total (X-Total-Count) needs the joins only for matches on a parent level's attributes: a
    # series or instance row exists only with its parent rows (inserted with them in the STOW index
    # transaction, never deleted apart), so counting the level's own table gives the same number —
    # a b-tree count ungated and a seek of the consent_no index gated, where the join made SQLite
    # read every row of the level.
    joins = {TABLES[a.level] for a, _ in q.matches} | ({SE} if q.series_uid and own is ST else set())
    count = select(func.count()).select_from(own if joins <= {own} else frm).where(*where)
    return stmt, count

def _view_statements(q: QidoQuery, level: str, scope: AccessScope, views: dict,
                     releasable_only: bool = False) -> tuple[Any, Any]:
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
    if q.study_uid:
        where.append(own.c.study_uid == q.study_uid)
    if q.series_uid:
        where.append((own if own is not st else se).c.series_uid == q.series_uid)
    where += [_predicate(q, a, v, views) for a, v in q.matches]
    if releasable_only:
        where.append(releasable(IN) if own is IN else _has_releasable(own, _KEY[level], scope, True))
    stmt = select(*cols).select_from(frm).where(*where).order_by(*order).limit(q.limit).offset(q.offset)
    return stmt, select(func.count()).select_from(frm).where(*where)


__all__ = ["TABLES", "releasable", "statements"]
