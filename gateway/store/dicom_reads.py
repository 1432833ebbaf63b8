"""Reads of the DICOM index that answer a requester (QIDO-RS search, the WADO-RS instance look-up), built
only from an :class:`~gateway.store.access.Access` — the gate's decision for that requester: no scope,
no query builder. Each statement is built once per (scope, shape) with bound parameters."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import and_, bindparam, select

from gateway.store import dicom_views
from gateway.store import qido as qido_sql
from gateway.store.access import Access
from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_study
from gateway.store.scope import AccessScope
from mappings.dicom.qido import QidoQuery

#: built statements by (scope, shape); cleared when it grows past 256 (scopes are few per deployment)
_STMTS: dict[tuple, Any] = {}

_KEY = {"studies": "study_uid", "series": "series_uid", "instances": "sop_uid"}


def _cached(key: tuple, build):
    stmt = _STMTS.get(key)
    if stmt is None:
        stmt = build()
        if len(_STMTS) >= 256:
            _STMTS.clear()
        _STMTS[key] = stmt
    return stmt


async def qido(access: Access, level: str, q: QidoQuery, *, report_conflicts: bool = False,
               releasable_only: bool = False) -> tuple[int, list[dict], list[str]]:
    """QIDO-RS matches of ``q`` at ``level`` visible to ``access``: (total before paging, the page's rows —
    with ``_meta``, a representative instance's DICOM JSON, when ``q`` asks for more attributes —, the
    conflicting studies among them when ``report_conflicts``). A research scope reads per-patient rows when
    conflicting studies (instances of several patients) are stored, so every answer is built from
    permitted instances only. ``releasable_only`` (a de-identified answer): only what the de-identification
    profile releases is matched, counted and used as a representative instance
    (:func:`gateway.store.qido.releasable`)."""
    scope = access.scope
    plain = qido_sql.statements(q, level, scope, releasable_only=releasable_only)
    with_meta = bool(q.extra_tags(level) or q.include_all)
    meta_stmt = _meta_stmt(level, scope, releasable_only) if with_meta else None

    def read(conn) -> tuple[int, list[dict], list[str]]:  # one hand-over for every statement (read_sync)
        stmt, count_stmt = plain
        if not scope.unrestricted and conn.execute(dicom_views.has_conflicts_stmt()).first() is not None:
            stmt, count_stmt = qido_sql.statements(q, level, scope, _views(), releasable_only=releasable_only)
        total = conn.execute(count_stmt).scalar_one()
        results = [dict(r) for r in conn.execute(stmt).mappings()]
        if meta_stmt is not None:
            key = _KEY[level]
            for r in results:
                meta = conn.execute(meta_stmt, {"uid": r[key], "pid": r.get("patient_id")}).scalar()
                r["_meta"] = orjson.loads(meta) if meta else {}
        conflicts: list[str] = []
        if report_conflicts and results:
            uids = sorted({r["study_uid"] for r in results})
            conflicts = list(conn.execute(dicom_views.conflicting_stmt(), {"b_uids": uids}).scalars())
        return total, results, conflicts

    return await access.read_sync(read)


async def stored_study_uids(db) -> list[str]:
    """Every stored Study Instance UID, for the de-identified UID index (gateway.services.deid.UidIndex):
    it maps a project's UIDs back to these; what a requester then gets is decided by a gated read."""
    return [r["study_uid"] for r in await db.read_rows(dicom_views.study_uids_stmt(), {})]


def _views() -> dict:
    return {dcm_study: dicom_views.study_view(), dcm_series: dicom_views.series_view()}


def _meta_stmt(level: str, scope: AccessScope, releasable_only: bool = False):
    """Representative instance metadata for includefield (the first instance of the study/series) — for
    a research scope the first *permitted* instance of the row's own patient (a study's row may be one
    patient's part of a conflicting study), never another patient's."""
    key = _KEY[level]

    def build():
        c = dcm_instance.c
        stmt = select(c.metadata).where(getattr(c, key) == bindparam("uid"))
        if not scope.unrestricted:
            stmt = stmt.where(scope.row_clause(c.consent_no), c.patient_id.is_not_distinct_from(bindparam("pid")))
        if releasable_only:
            stmt = stmt.where(qido_sql.releasable(dcm_instance))
        return stmt.order_by(c.instance_number).limit(1)

    return _cached(("qido meta", key, scope if not scope.unrestricted else None, releasable_only), build)


async def instances(access: Access, study: str, series: str | None = None, sop: str | None = None, *,
                    metadata: bool = True) -> list[dict]:
    """The index rows of the visible instances of a study / series / instance, in series, instance number
    and SOP Instance UID order; ``metadata=False`` leaves out the stored DICOM JSON (a few KB per row)."""
    stmt = _instances_stmt(access.scope, bool(series), bool(sop), metadata)
    return await access.read_rows(stmt, {"study": study, "series": series, "sop": sop})


def _instances_stmt(scope: AccessScope, by_series: bool, by_sop: bool, metadata: bool):
    """The WADO instance look-up, built once per (scope, shape) with bound parameters (building the
    statement costs more than running it)."""

    def build():
        c = dcm_instance.c
        where = [c.study_uid == bindparam("study"), scope.row_clause(c.consent_no)]
        if by_series:
            where.append(c.series_uid == bindparam("series"))
        if by_sop:
            where.append(c.sop_uid == bindparam("sop"))
        cols = dcm_instance.c if metadata else [col for col in dcm_instance.c if col.name != "metadata"]
        return select(*cols).where(and_(*where)).order_by(c.series_uid, c.instance_number, c.sop_uid)

    return _cached((scope, by_series, by_sop, metadata), build)


__all__ = ["instances", "qido"]
