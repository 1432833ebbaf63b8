"""Reads of patient data for inference jobs (``gateway.services.inference``): series selection for a
request, a cohort or the auto-trigger scan, the instances a job runs on, the visibility of jobs, and the
monitoring context.

Every function takes the :class:`AccessScope` the consent gate gave the job's requester as a required
argument (no scope, no query); its predicate for each table comes from :func:`gateway.store.access.where`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from gateway.store import schema as s
from gateway.store.access import require_scope, where
from gateway.store.cohort import compile_cohort
from gateway.store.dicom_schema import dcm_instance, dcm_series
from gateway.store.scope import AccessScope
from mappings.cohort import Node

CHUNK = 500


async def study_series(conn, scope: AccessScope, study: str, series: str | None) -> list[dict[str, Any]]:
    """The visible series rows of ``study`` (only ``series`` when given)."""
    require_scope(scope)
    q = select(dcm_series).where(dcm_series.c.study_uid == study, where(scope, dcm_series))
    if series:
        q = q.where(dcm_series.c.series_uid == series)
    return [dict(r) for r in (await conn.execute(q)).mappings().all()]


async def cohort_series(conn, scope: AccessScope, root: Node, limit: int) -> list[dict[str, Any]]:
    """The visible series rows of the cohort ``root``'s patients (at most ``limit``, by series UID)."""
    require_scope(scope)
    patients = compile_cohort(root, scope).subquery()
    return [dict(r) for r in (await conn.execute(select(dcm_series).where(
        dcm_series.c.patient_id.in_(select(patients.c.patient_id)),
        where(scope, dcm_series)).order_by(dcm_series.c.series_uid).limit(limit))).mappings().all()]


async def settled_series(conn, scope: AccessScope, after: float, until: float) -> list[dict[str, Any]]:
    """The visible series rows last updated in (``after``, ``until``] (the auto-trigger scan)."""
    require_scope(scope)
    return [dict(r) for r in (await conn.execute(select(dcm_series).where(
        dcm_series.c.updated_ts > after, dcm_series.c.updated_ts <= until,
        where(scope, dcm_series)))).mappings().all()]


async def sop_classes(conn, scope: AccessScope, series_uids: list[str]) -> dict[str, set[str]]:
    """Series UID → the SOP classes of its visible instances."""
    require_scope(scope)
    out: dict[str, set[str]] = {}
    for i in range(0, len(series_uids), CHUNK):
        rows = (await conn.execute(select(dcm_instance.c.series_uid, dcm_instance.c.sop_class_uid).where(
            dcm_instance.c.series_uid.in_(series_uids[i:i + CHUNK]), where(scope, dcm_instance)).distinct())).all()
        for s_uid, c in rows:
            out.setdefault(s_uid, set()).add(c)
    return out


async def visible_series(conn, scope: AccessScope, series_uids: list[str]) -> set[str]:
    """Those of ``series_uids`` with an instance the scope may see."""
    require_scope(scope)
    uids = sorted(set(series_uids))
    if not uids:
        return set()
    if scope.unrestricted:
        return set(uids)
    out: set[str] = set()
    for i in range(0, len(uids), CHUNK):
        out |= set((await conn.execute(select(dcm_instance.c.series_uid).distinct().where(
            dcm_instance.c.series_uid.in_(uids[i:i + CHUNK]), where(scope, dcm_instance)))).scalars())
    return out


async def series_instances(conn, scope: AccessScope, series_uid: str) -> list[Any]:
    """The visible instance rows of one series, in instance order."""
    require_scope(scope)
    return list((await conn.execute(select(dcm_instance).where(
        dcm_instance.c.series_uid == series_uid, where(scope, dcm_instance))
        .order_by(dcm_instance.c.instance_number, dcm_instance.c.sop_uid))).mappings().all())


async def monitoring_context(conn, scope: AccessScope, series_uid: str, patient_id: str | None) -> tuple[Any, Any]:
    """(manufacturer, model_name, protocol_name) of the series and (sex, birth_year) of the patient, as far
    as the scope sees them (None where it does not)."""
    require_scope(scope)
    se = (await conn.execute(select(dcm_series.c.manufacturer, dcm_series.c.model_name,
                                    dcm_series.c.protocol_name).where(
        dcm_series.c.series_uid == series_uid, where(scope, dcm_series)))).first()
    pt = (await conn.execute(select(s.cm_patient.c.sex, s.cm_patient.c.birth_year).where(
        s.cm_patient.c.patient_id == patient_id, where(scope, s.cm_patient)).limit(1))).first() if patient_id else None
    return se, pt


async def tagged_observations(conn, scope: AccessScope, tag_system: str, tag_code: str) -> list[bytes | str]:
    """The content of the visible, current Observations carrying the ``_tag`` ``tag_system|tag_code``."""
    require_scope(scope)
    R, t = s.fhir_resource, s.idx_token
    q = select(R.c.content).join(t, t.c.rid == R.c.rid).where(
        t.c.res_type == "Observation", t.c.param == "_tag", t.c.system == tag_system,
        t.c.code == tag_code, R.c.deleted.is_(False), where(scope, R))
    return [content for (content,) in (await conn.execute(q)).all()]


__all__ = ["cohort_series", "monitoring_context", "series_instances", "settled_series", "sop_classes",
           "study_series", "tagged_observations", "visible_series"]
