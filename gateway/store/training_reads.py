"""Reads of patient data for federated training (``gateway.services.training``): the instances of a
cohort's members within the consent scope, the label's SEG segments, the patients a scope may see in a
manifest.  Every function takes the :class:`AccessScope` the consent gate gave the requester as a required
argument (no scope, no query); each table's predicate comes from :func:`gateway.store.access.where`."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from sqlalchemy import func, select

from gateway.store.access import require_scope, where
from gateway.store.cohort import Compiler, compile_cohort
from gateway.store.dicom_schema import dcm_instance, dcm_seg_segment, dcm_series
from gateway.store.schema import cm_patient
from gateway.store.scope import AccessScope
from mappings.cohort import Expander, Node

ID_CHUNK = 5000


async def cohort_instances(conn, scope: AccessScope, cohort: Node, label: Node, *, expand: Expander | None,
                           today: _dt.date, modalities: list[str] | None) -> tuple[list[str], set[str], list[Any]]:
    """(members, label-positive members, instance rows) of the cohort within ``scope``.  Rows: patient_id,
    sop_uid, blob_path, manufacturer, sex, birth_date, consent_profile — images only (``rows`` set), each
    instance by its own patient link, in a reproducible order (patient, series number, instance number)."""
    require_scope(scope)
    cohort_q = compile_cohort(cohort, scope, expand=expand, today=today)
    label_q = compile_cohort(label, scope, expand=expand, today=today)
    members = sorted({r[0] for r in (await conn.execute(cohort_q)).all() if r[0]})
    positive = {r[0] for r in (await conn.execute(label_q)).all()}
    rows: list[Any] = []
    for i in range(0, len(members), ID_CHUNK):
        ids = members[i:i + ID_CHUNK]
        q = (select(dcm_instance.c.patient_id, dcm_instance.c.sop_uid, dcm_instance.c.blob_path,
                    dcm_series.c.manufacturer, cm_patient.c.sex, cm_patient.c.birth_date,
                    cm_patient.c.consent_profile)
             .join(dcm_series, dcm_series.c.series_uid == dcm_instance.c.series_uid)
             .join(cm_patient, cm_patient.c.patient_id == dcm_instance.c.patient_id)
             .where(dcm_instance.c.patient_id.in_(ids), where(scope, dcm_instance),
                    where(scope, cm_patient), dcm_instance.c.rows.is_not(None))
             # a reproducible sample order (UIDs are random): patient, series, instance number
             .order_by(dcm_instance.c.patient_id, dcm_series.c.series_number, dcm_instance.c.instance_number,
                       dcm_instance.c.sop_uid))
        if modalities:
            q = q.where(func.upper(dcm_series.c.modality).in_(modalities))
        rows.extend((await conn.execute(q)).all())
    return members, positive, rows


async def seg_items(conn, scope: AccessScope, members: list[str], segment) -> list[tuple[str, int]]:
    """(SEG blob path, segment number) of the segments matching ``segment`` (a cohort ``segments``
    criterion) in the SEG instances of ``members``."""
    require_scope(scope)
    t = dcm_seg_segment
    out = []
    for i in range(0, len(members), ID_CHUNK):
        q = (select(dcm_instance.c.blob_path, t.c.segment_number)
             .join(dcm_instance, dcm_instance.c.sop_uid == t.c.sop_uid)
             .where(t.c.patient_id.in_(members[i:i + ID_CHUNK]),
                    scope.patient_clause(t.c.patient_id, allow_no_patient=False), *Compiler._segment_conds(t, segment))
             .order_by(t.c.sop_uid, t.c.segment_number))
        out += [(r[0], int(r[1])) for r in (await conn.execute(q)).all()]
    return out


async def visible_patients(conn, scope: AccessScope) -> set[str] | None:
    """The ids of the patients ``scope`` may see (None: every patient)."""
    require_scope(scope)
    if scope.unrestricted:
        return None
    return set((await conn.execute(select(cm_patient.c.patient_id).where(
        where(scope, cm_patient), cm_patient.c.patient_id.is_not(None)))).scalars())


__all__ = ["cohort_instances", "seg_items", "visible_patients"]
