"""Compile a cohort criterion tree (:mod:`mappings.cohort.language`) to SQLAlchemy Core.

The result is ``SELECT DISTINCT cm_patient.patient_id`` over the common model (``cm_*``) and the DICOM
index (``dcm_study``, ``dcm_series``, ``dcm_seg_segment``, ``dcm_sr_item``), always intersected with
the consent scope's visible patients.  The same statement runs on SQLite and PostgreSQL: every leaf is a
``patient_id IN (SELECT ...)`` semi-join (NULL patient ids filtered so ``NOT`` stays two-valued) — in a
conjunction, one leaf drives and the others are correlated ``EXISTS`` probes (:meth:`Compiler._conjunction`);
relative time windows join a leaf's events with its anchor's events on day numbers (:class:`iso_days`,
:class:`da_days`, compiled per dialect).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from sqlalchemy import Float, Select, and_, cast, false, func, literal, not_, null, or_, select, true, union_all
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from gateway.store.schema import cm_condition, cm_observation, cm_patient, cm_procedure
from gateway.store.scope import AccessScope
from mappings.cohort.language import CohortError, Expander, Node, find


# ------------------------------------------------------------------------------------------------
# Day numbers of text dates, per dialect
# ------------------------------------------------------------------------------------------------


class iso_days(FunctionElement):
    """Day number of an ISO-8601 date/dateTime text column (first 10 characters); NULL if partial."""

    type = Float()
    inherit_cache = True
    name = "iso_days"


class da_days(FunctionElement):
    """Day number of a DICOM DA text column (YYYYMMDD); NULL if malformed."""

    type = Float()
    inherit_cache = True
    name = "da_days"


@compiles(iso_days, "sqlite")
def _iso_sqlite(el, compiler, **kw):
    return "julianday(substr(%s, 1, 10))" % compiler.process(el.clauses, **kw)


@compiles(iso_days, "postgresql")
def _iso_pg(el, compiler, **kw):
    x = compiler.process(el.clauses, **kw)
    return (f"(CASE WHEN {x} ~ '^[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}' "
            f"THEN (to_date(substr({x}, 1, 10), 'YYYY-MM-DD') - DATE '1970-01-01') END)")


@compiles(da_days, "sqlite")
def _da_sqlite(el, compiler, **kw):
    x = compiler.process(el.clauses, **kw)
    return f"julianday(substr({x}, 1, 4) || '-' || substr({x}, 5, 2) || '-' || substr({x}, 7, 2))"


@compiles(da_days, "postgresql")
def _da_pg(el, compiler, **kw):
    x = compiler.process(el.clauses, **kw)
    return f"(CASE WHEN {x} ~ '^[0-9]{{8}}$' THEN (to_date({x}, 'YYYYMMDD') - DATE '1970-01-01') END)"


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _dicom():
    from gateway.store import dicom_schema

    return dicom_schema


def text_match(col: ColumnElement, pattern: str) -> ColumnElement:
    """Case-insensitive match; ``*`` is a wildcard (``%`` and ``_`` are literal)."""
    p = pattern.lower()
    if "*" not in p:
        return func.lower(col) == p
    esc = p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
    return func.lower(col).like(esc, escape="\\")


def _range(col: ColumnElement, lo, hi) -> list[ColumnElement]:
    out = []
    if lo is not None:
        out.append(col >= lo)
    if hi is not None:
        out.append(col <= hi)
    return out


def _date_range(col: ColumnElement, dr, *, dicom: bool = False) -> list[ColumnElement]:
    if dr is None:
        return []
    out = []
    if dicom:
        if dr.from_:
            out.append(col >= dr.from_.replace("-", ""))
        if dr.to:
            out.append(col <= dr.to.replace("-", ""))
    else:
        if dr.from_:
            out.append(func.substr(col, 1, 10) >= dr.from_)
        if dr.to:
            out.append(func.substr(col, 1, 10) <= dr.to)
    return out


def _split(token: str, sep: str = "|") -> tuple[str | None, str]:
    if sep in token:
        system, _, code = token.rpartition(sep)
        return (system or None), code
    return None, token


def _years_before(at: _dt.date, years: int) -> str:
    try:
        return at.replace(year=at.year - years).isoformat()
    except ValueError:  # 29 February
        return at.replace(year=at.year - years, day=28).isoformat()


@dataclass
class Compiler:
    expand: Expander | None = None
    today: _dt.date | None = None
    #: False: every leaf of an ``all`` an ``IN`` semi-join (the form before :meth:`_conjunction`; tests
    #: compare the two)
    drive: bool = True

    # -- entry --------------------------------------------------------------------------------
    def compile(self, root: Node, scope: AccessScope) -> Select:
        """The cohort's patients within ``scope`` — required: the access layer's rule is no scope, no query
        (an unrestricted scope is itself a decision of the gate, ``gateway.store.scope.UNRESTRICTED``)."""
        if not isinstance(scope, AccessScope):
            raise TypeError("compile_cohort: an AccessScope from the consent gate is required")
        self.root = root
        stmt = select(cm_patient.c.patient_id).distinct().where(cm_patient.c.patient_id.is_not(None))
        stmt = stmt.where(self.predicate(root))
        if not scope.unrestricted:
            stmt = stmt.where(scope.patient_row_clause())
        return stmt

    # -- boolean -------------------------------------------------------------------------------
    def predicate(self, node: Node) -> ColumnElement:
        if node.kind == "all":
            return and_(true(), *self._conjunction(node.body))
        if node.kind == "any":
            return or_(false(), *(self.predicate(c) for c in node.body))
        if node.kind == "not":
            return not_(self.predicate(node.body))
        if node.kind == "sex":
            return cm_patient.c.sex.in_(list(node.body))
        if node.kind == "birth_year":
            return and_(cm_patient.c.birth_year.is_not(None), *_range(cm_patient.c.birth_year, node.body.min, node.body.max))
        if node.kind == "age" and node.body.at != "study":
            at = _dt.date.fromisoformat(node.body.at) if node.body.at else (self.today or _dt.date.today())
            conds = [cm_patient.c.birth_date.is_not(None)]
            if node.body.min is not None:  # born on or before at − min years
                conds.append(func.substr(cm_patient.c.birth_date, 1, 10) <= _years_before(at, node.body.min))
            if node.body.max is not None:  # born after at − (max+1) years
                conds.append(func.substr(cm_patient.c.birth_date, 1, 10) > _years_before(at, node.body.max + 1))
            return and_(*conds)
        return cm_patient.c.patient_id.in_(self.patients(node))

    #: Which semi-join of a conjunction drives it, most specific first (the others are probed per patient):
    #: an SR or SEG content match is usually rarer than an observation value, a procedure or an imaging
    #: series, and a diagnosis code is the broadest.  Only an ordering heuristic: every order is correct.
    DRIVE_ORDER = ("sr", "seg", "observation", "procedure", "imaging", "age", "condition")

    @staticmethod
    def _probe_ok(node: Node) -> bool:
        """A leaf whose patients can be tested one patient at a time with ``EXISTS``: no relative window
        and no event subquery over ``cm_patient`` itself (age at a study joins it)."""
        return node.kind in Compiler.DRIVE_ORDER and node.kind != "age" and getattr(node.body, "within", None) is None

    def _conjunction(self, children) -> list[ColumnElement]:
        """The terms of an ``all``: one semi-join leaf, the most specific (:data:`DRIVE_ORDER`), stays
        ``patient_id IN (SELECT ...)`` and drives the statement; the other leaves become correlated
        ``EXISTS (... WHERE leaf.patient_id = cm_patient.patient_id)``, index probes for the driver's
        patients.  With every leaf an ``IN``, SQLite built each leaf's whole patient list (15k
        hypertension patients, 15k cardiac MR series at 50k patients) to intersect a 3k-patient SR list;
        PostgreSQL turns both forms into the same semi-joins.  ``NOT`` stays two-valued: neither form
        yields NULL (the leaves filter NULL patient ids)."""
        probes = [c for c in children if self.drive and self._probe_ok(c)]
        driver = min(probes, key=lambda c: self.DRIVE_ORDER.index(c.kind)) if len(probes) > 1 else None
        return [self._exists(c) if c in probes and c is not driver else self.predicate(c) for c in children]

    def _exists(self, node: Node) -> ColumnElement:
        sel = self.patients(node)
        return sel.where(sel.selected_columns[0] == cm_patient.c.patient_id).exists()

    # -- leaves: patient ids -----------------------------------------------------------------------
    def patients(self, node: Node) -> Select:
        within = getattr(node.body, "within", None)
        if within is None:  # no day needed (an imaging leaf then reads the series alone)
            ev = self._imaging(node.body, need_day=False) if node.kind == "imaging" else self.events(node)
            return select(ev.c.patient_id)
        ev = self.events(node)
        anchor = self.anchor(node, within.of)
        day_diff = ev.c.day - anchor.c.day
        return (select(ev.c.patient_id).select_from(ev.join(anchor, ev.c.patient_id == anchor.c.patient_id))
                .where(*_range(day_diff, within.min_days, within.max_days)))

    def anchor(self, node: Node, of: str):
        if of == "imaging":
            st = _dicom().dcm_study
            return (select(st.c.patient_id, da_days(st.c.study_date).label("day"))
                    .where(st.c.patient_id.is_not(None)).subquery())
        target = find(self.root, of)
        if target is None or target.kind not in ("condition", "procedure", "observation", "imaging"):
            raise CohortError(f"{node.path}.{node.kind}.within.of",
                              f"{of!r} must name a condition, procedure, observation or imaging criterion")
        return self.events(target, with_within=True)

    def events(self, node: Node, *, with_within: bool = False):
        """A subquery (patient_id, day) of the leaf's matching events (day may be NULL)."""
        if with_within and getattr(node.body, "within", None) is not None:
            # the anchor's own window constrains which of its events count
            inner = self.events(node)
            anchor = self.anchor(node, node.body.within.of)
            diff = inner.c.day - anchor.c.day
            return (select(inner.c.patient_id, inner.c.day).select_from(
                inner.join(anchor, inner.c.patient_id == anchor.c.patient_id))
                .where(*_range(diff, node.body.within.min_days, node.body.within.max_days)).subquery())
        kind, b = node.kind, node.body
        if kind == "condition":
            t = cm_condition
            conds = _date_range(t.c.onset, b.date)
            if b.clinical_status:
                conds.append(t.c.clinical_status == b.clinical_status)
            return self._coded_events(t, b, iso_days(t.c.onset), conds)
        if kind == "procedure":
            t = cm_procedure
            return self._coded_events(t, b, iso_days(t.c.performed), _date_range(t.c.performed, b.date))
        if kind == "observation":
            t = cm_observation
            conds = _date_range(t.c.effective, b.date)
            if b.value is not None:
                conds += [t.c.value_num.is_not(None), *_range(t.c.value_num, b.value.min, b.value.max)]
            if b.unit is not None:
                conds.append(t.c.unit == b.unit)
            if b.value_code:
                vc = []
                for tok in b.value_code:
                    system, code = _split(tok)
                    vc.append(and_(t.c.value_code == code, *([t.c.value_system == system] if system else [])))
                conds.append(or_(*vc))
            return self._coded_events(t, b, iso_days(t.c.effective), conds)
        if kind == "imaging":
            return self._imaging(b)
        if kind == "age":  # at == "study": age at an imaging study
            d = _dicom()
            st = d.dcm_study
            age = (da_days(st.c.study_date) - iso_days(cm_patient.c.birth_date)) / 365.25
            conds = []
            if b.min is not None:
                conds.append(age >= b.min)
            if b.max is not None:
                conds.append(age < b.max + 1)
            return (select(st.c.patient_id, da_days(st.c.study_date).label("day"))
                    .select_from(st.join(cm_patient, cm_patient.c.patient_id == st.c.patient_id))
                    .where(st.c.patient_id.is_not(None), *conds).subquery())
        if kind == "seg":
            return self._seg(b)
        if kind == "sr":
            return self._sr(b)
        raise CohortError(node.path, f"criterion {kind!r} has no events")  # pragma: no cover

    @staticmethod
    def _event_select(pid: ColumnElement, day: ColumnElement, conds: list[ColumnElement]):
        return select(pid.label("patient_id"), day.label("day")).where(pid.is_not(None), *conds).subquery()

    def _codes(self, t, b) -> list[ColumnElement]:
        """The code criterion as conditions on ``t`` (the expander's codes included); codes whose
        descendants come from the vocabulary store are left to :meth:`_coded_events`."""
        if not b.code:
            return []
        by_system: dict[str | None, set[str]] = {}
        for tok in b.code:
            system, code = _split(tok)
            codes = {code}
            if b.descendants and self.expand is not None:
                codes.update(self.expand(system, code))
            by_system.setdefault(system, set()).update(codes)
        ors = []
        for system, codes in by_system.items():
            c = t.c.code.in_(sorted(codes)) if len(codes) > 1 else t.c.code == next(iter(codes))
            ors.append(and_(c, t.c.system == system) if system else c)
        return [or_(*ors)]

    def _coded_events(self, t, b, day: ColumnElement, conds: list[ColumnElement]):
        """Events of a coded leaf: ``conds`` (its other conditions) and its codes.  With ``descendants``
        and no expander, the descendants come from the vocabulary store's active closure
        (gateway/store/vocab_schema.py) in the same statement, as a join that drives from the
        descendant list into the code index (a ``code IN (subquery)`` made SQLite scan the table)."""
        if not (b.code and b.descendants and self.expand is None):
            return self._event_select(t.c.patient_id, day, self._codes(t, b) + conds)
        from gateway.store.vocab_schema import descendants_select

        cols = (t.c.patient_id.label("patient_id"), day.label("day"))
        branches = [select(*cols).where(t.c.patient_id.is_not(None), *self._codes(t, b), *conds)]
        for tok in b.code:
            system, code = _split(tok)
            d = descendants_select(system, code).distinct().subquery()  # DISTINCT: SQLite materialises it
            j = select(*cols).select_from(d.join(t, t.c.code == d.c.descendant))
            branches.append(j.where(t.c.patient_id.is_not(None), *([t.c.system == system] if system else []), *conds))
        return union_all(*branches).subquery()

    def _imaging(self, b, *, need_day: bool = True):
        d = _dicom()
        se, st = d.dcm_series, d.dcm_study
        conds: list[ColumnElement] = [se.c.patient_id.is_not(None)]
        if b.modality:
            # CS values are upper case by definition (PS3.5 6.2): compare as stored so the index serves
            conds.append(se.c.modality.in_([m.upper() for m in b.modality]))
        if b.body_part:
            conds.append(se.c.body_part.in_([p.upper() for p in b.body_part]))
        for col, pat in ((se.c.manufacturer, b.manufacturer), (se.c.model_name, b.model),
                         (se.c.protocol_name, b.protocol), (se.c.series_description, b.series_description),
                         (st.c.study_description, b.study_description)):
            if pat is not None:
                conds.append(text_match(col, pat))
        conds += _date_range(st.c.study_date, b.study_date, dicom=True)
        if b.slice_thickness is not None:
            conds += [se.c.slice_thickness.is_not(None),
                      *_range(se.c.slice_thickness, b.slice_thickness.min, b.slice_thickness.max)]
        if need_day or b.study_description is not None or b.study_date is not None:
            dicom = (select(se.c.patient_id.label("patient_id"), da_days(st.c.study_date).label("day"))
                     .select_from(se.join(st, st.c.study_uid == se.c.study_uid)).where(*conds))
        else:  # every series row has its study row (written in one transaction)
            dicom = select(se.c.patient_id.label("patient_id"), cast(null(), Float).label("day")).where(*conds)
        branches = [dicom]
        # the same criterion over imaging known from other origins (docs/vocab.md, "Imaging"): a field an
        # origin does not carry cannot be confirmed there, so a criterion using it matches DICOM only
        dicom_only = (b.manufacturer, b.model, b.protocol, b.series_description, b.slice_thickness)
        if all(x is None for x in dicom_only):
            from gateway.store.schema import cm_imaging_series, cm_imaging_study

            ims = cm_imaging_series  # OMOP image_occurrence: modality, anatomic site, date
            if b.study_description is None:
                oc = [ims.c.patient_id.is_not(None)]
                if b.modality:
                    oc.append(ims.c.modality.in_([m.upper() for m in b.modality]))
                if b.body_part:
                    oc.append(ims.c.body_part.in_([p.upper() for p in b.body_part]))
                oc += _date_range(ims.c.started, b.study_date)
                branches.append(select(ims.c.patient_id.label("patient_id"), iso_days(ims.c.started).label("day"))
                                .where(*oc))
            ist = cm_imaging_study  # FHIR ImagingStudy: modalities, description, started (no body part)
            if not b.body_part:
                fc = [ist.c.patient_id.is_not(None), ist.c.src_type != "OMOP"]
                if b.modality:
                    fc.append(or_(*[ist.c.modalities.contains(f'"{m.upper()}"', autoescape=True) for m in b.modality]))
                if b.study_description is not None:
                    fc.append(text_match(ist.c.description, b.study_description))
                fc += _date_range(ist.c.started, b.study_date)
                branches.append(select(ist.c.patient_id.label("patient_id"), iso_days(ist.c.started).label("day")).where(*fc))
        return union_all(*branches).subquery()

    @staticmethod
    def _segment_conds(t, s) -> list[ColumnElement]:
        conds = []
        if s.label:
            conds.append(text_match(t.c.label, s.label))
        for cols, tok in (((t.c.type_scheme, t.c.type_code), s.type), ((t.c.category_scheme, t.c.category_code), s.category)):
            if tok:
                scheme, code = _split(tok)
                conds.append(cols[1] == code)
                if scheme:
                    conds.append(cols[0] == scheme)
        if s.algorithm_type:
            conds.append(func.upper(t.c.algorithm_type) == s.algorithm_type)
        return conds

    def _seg(self, b):
        d = _dicom()
        seg = d.dcm_seg_segment
        first = seg.alias("seg0")
        conds = [first.c.patient_id.is_not(None), *self._segment_conds(first, b.segments[0])]
        for i, s in enumerate(b.segments[1:], start=1):
            other = seg.alias(f"seg{i}")
            conds.append(select(literal(1)).where(other.c.sop_uid == first.c.sop_uid,
                                                  *self._segment_conds(other, s)).exists())
        st = d.dcm_study
        return (select(first.c.patient_id.label("patient_id"), da_days(st.c.study_date).label("day"))
                .select_from(first.outerjoin(st, st.c.study_uid == first.c.study_uid)).where(*conds).subquery())

    @staticmethod
    def _item_conds(t, it) -> list[ColumnElement]:
        conds = []
        if it.concept:
            scheme, code = _split(it.concept, ":")
            conds.append(t.c.concept_code == code)
            if scheme:
                conds.append(t.c.concept_scheme == scheme)
        if it.path:
            conds.append(text_match(t.c.concept_path, it.path))
        if it.value is not None:
            conds += [t.c.num_value.is_not(None), *_range(t.c.num_value, it.value.min, it.value.max)]
        if it.unit:
            conds.append(t.c.unit_code == it.unit)
        if it.code:
            scheme, code = _split(it.code)
            conds.append(t.c.code_value == code)
            if scheme:
                conds.append(t.c.code_scheme == scheme)
        if it.text:
            conds.append(text_match(t.c.text_value, it.text))
        return conds

    def _sr(self, b):
        d = _dicom()
        item = d.dcm_sr_item
        first = item.alias("sr0")
        conds = [first.c.patient_id.is_not(None), *self._item_conds(first, b.items[0])]
        if b.same == "group":
            conds.append(first.c.group_item_id.is_not(None))
        for i, it in enumerate(b.items[1:], start=1):
            other = item.alias(f"sr{i}")
            same = [other.c.sop_uid == first.c.sop_uid]
            if b.same == "group":
                same.append(other.c.group_item_id == first.c.group_item_id)
            conds.append(select(literal(1)).where(*same, *self._item_conds(other, it)).exists())
        return select(first.c.patient_id.label("patient_id"), cast(null(), Float).label("day")).where(*conds).subquery()


def compile_cohort(root: Node, scope: AccessScope, *, expand: Expander | None = None,
                   today: _dt.date | None = None) -> Select:
    """``SELECT DISTINCT patient_id`` of the cohort ``root``, within ``scope`` (required)."""
    return Compiler(expand=expand, today=today).compile(root, scope)


__all__ = ["compile_cohort", "Compiler", "Expander", "iso_days", "da_days", "text_match"]
