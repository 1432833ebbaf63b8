"""Reads of the federation site answer: series and per-patient values of a gated cohort.

The site first selects the cohort's *eligible* patients (the cohort SQL intersected with the consent
scope); these reads then take only those patients' rows, and each read carries the scope's predicate for
its table as well (``gateway.store.access.where`` where the table is registered), so nothing released is
computed over a refused patient even if a caller passed the wrong ids."""

from __future__ import annotations

import datetime as _dt

from sqlalchemy import and_, func, select

from gateway.store.access import require_scope, where
from gateway.store.cohort import compile_cohort
from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_sr_item
from gateway.store.schema import cm_observation, cm_patient
from gateway.store.scope import AccessScope
from mappings.cohort import Expander, Node

ID_CHUNK = 5000


async def eligible(conn, scope: AccessScope, root: Node, *, expand: Expander | None = None,
                   today: _dt.date | None = None, series: bool = False) -> list:
    """(patient_id, sex, birth_date) rows of the cohort ``root`` within ``scope`` (one or more per patient).

    ``series``: rows (patient_id, sex, birth_date, upper-case modality, manufacturer) instead, one per
    series of the patient that ``scope`` permits (NULL modality and manufacturer for a patient without
    one) — the cohort and its series in one statement, as :func:`series_of` would give them for the
    cohort's ids, without a second round trip and its list of ids."""
    require_scope(scope)
    stmt = compile_cohort(root, scope, expand=expand, today=today).with_only_columns(
        cm_patient.c.patient_id, cm_patient.c.sex, cm_patient.c.birth_date)
    if series:
        c, se = stmt.subquery("cohort"), dcm_series
        stmt = (select(c.c.patient_id, c.c.sex, c.c.birth_date, func.upper(se.c.modality), se.c.manufacturer)
                .select_from(c.outerjoin(se, and_(se.c.patient_id == c.c.patient_id, where(scope, se)))))
    return (await conn.execute(stmt)).all()


async def series_of(conn, scope: AccessScope, ids: list[str]) -> list[tuple]:
    """(patient, upper-case modality, manufacturer) of the series of the patients ``ids``."""
    require_scope(scope)
    out = []
    for i in range(0, len(ids), ID_CHUNK):
        stmt = (select(dcm_series.c.patient_id, func.upper(dcm_series.c.modality), dcm_series.c.manufacturer)
                .distinct().where(dcm_series.c.patient_id.in_(ids[i:i + ID_CHUNK]), where(scope, dcm_series)))
        out.extend((await conn.execute(stmt)).all())
    return out


async def studies_of(conn, scope: AccessScope, ids: list[str]) -> list[str]:
    """The Study Instance UIDs holding instances of the patients ``ids`` that ``scope`` permits (instances
    are gated one by one, as WADO-RS reads them), in UID order."""
    out: set[str] = set()
    for i in range(0, len(ids), ID_CHUNK):
        stmt = (select(dcm_instance.c.study_uid).distinct()
                .where(dcm_instance.c.patient_id.in_(ids[i:i + ID_CHUNK]), where(scope, dcm_instance)))
        out.update(r[0] for r in await conn.execute(stmt))
    return sorted(out)


async def mean_values(conn, scope: AccessScope, name: str, ids: list[str]) -> dict[str, float]:
    """Per patient of ``ids``, the mean of a numeric field: ``slice_thickness`` (series),
    ``observation:<system|code>`` (value_num), ``sr:<scheme:code>`` (SR NUM items)."""
    require_scope(scope)
    kind, _, arg = name.partition(":")
    if name == "slice_thickness":
        t = dcm_series
        col, conds = t.c.slice_thickness, [where(scope, t)]
    elif kind == "observation":
        t = cm_observation
        system, _, code = arg.rpartition("|")
        col, conds = t.c.value_num, [t.c.code == code, where(scope, t)] + ([t.c.system == system] if system else [])
    else:
        t = dcm_sr_item
        scheme, _, code = arg.rpartition(":")
        col, conds = t.c.num_value, [t.c.concept_code == code, scope.patient_clause(t.c.patient_id)] + (
            [t.c.concept_scheme == scheme] if scheme else [])
    values: dict[str, float] = {}
    for i in range(0, len(ids), ID_CHUNK):
        stmt = (select(t.c.patient_id, func.avg(col))
                .where(col.is_not(None), *conds, t.c.patient_id.in_(ids[i:i + ID_CHUNK]))
                .group_by(t.c.patient_id))
        for pid, v in (await conn.execute(stmt)).all():
            if v is not None:
                values[pid] = float(v)
    return values


__all__ = ["eligible", "series_of", "mean_values"]
