"""Studies and series holding instances of several patients: per-patient parts.

A PACS merge error or a modality that reused a StudyInstanceUID puts instances of two patients under one
study (or series).  The study row (``dcm_study``) carries the attributes and counts of whichever instance
came first — its patient's name and ID, every series, every instance — so a research answer built from it
would show a refused patient's data next to a permitted one's.  DICOM is therefore linked **per instance**
(``dcm_instance.patient_id`` / ``consent_no``), and for such a *conflicting* study the store keeps one part
row per patient (``dcm_study_part``; ``dcm_series_part`` for a conflicting series): the study (series) as
that patient's own instances give it — patient name/ID/birth date/sex, study attributes, number of series
and instances, modalities — stamped with that patient's ``consent_no``.

A research scope reads :func:`study_view` / :func:`series_view` instead of the tables: rows of studies
without parts, plus the parts, so every study-level and series-level answer (QIDO, X-Total-Count,
includefield, the OMOP export) is built only from the instances of permitted patients.  Unrestricted
(treatment) scopes read the tables as they are; admins see conflicts reported (QIDO ``Warning`` header,
``fedgate dicom conflicts``).  The parts are rebuilt in the STOW index transaction that makes a study
conflicting or adds to one (:func:`sync_parts`); restamped with the patients' consent like every
stamped table (``consent_schema.stamped_tables``).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import bindparam, delete, exists, literal, select, union_all

from gateway.store.db import built_once
from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_series_part, dcm_study, dcm_study_part

ST, SE, IN = dcm_study, dcm_series, dcm_instance


def study_view():
    """``dcm_study`` rows of studies without parts, and the parts (same columns): one row per (study, patient)."""
    plain = select(ST).where(~exists(select(literal(1)).where(dcm_study_part.c.study_uid == ST.c.study_uid)))
    return union_all(plain, select(dcm_study_part)).subquery("v_study")


def series_view():
    """Like :func:`study_view` for series."""
    plain = select(SE).where(~exists(select(literal(1)).where(dcm_series_part.c.series_uid == SE.c.series_uid)))
    return union_all(plain, select(dcm_series_part)).subquery("v_series")


def has_conflicts_stmt():
    """``SELECT 1`` when any conflicting study is stored (the fast path needs no views otherwise)."""
    return built_once(("dicom conflicts any",), lambda: select(literal(1)).select_from(dcm_study_part).limit(1))


def conflicting_stmt():
    """Which of the studies ``:b_uids`` are conflicting."""
    return built_once(("dicom conflicts of",), lambda: select(dcm_study_part.c.study_uid).distinct().where(
        dcm_study_part.c.study_uid.in_(bindparam("b_uids", expanding=True))))


async def list_conflicts(conn) -> list[dict]:
    """Every conflicting study (admin report, ``fedgate dicom-conflicts``): its UID, number of patients and
    instances, and per patient (common-model id) its series and instance counts."""
    p = dcm_study_part.c
    rows = (await conn.execute(select(p.study_uid, p.patient_id, p.num_series, p.num_instances)
                               .order_by(p.study_uid, p.patient_id))).all()
    out: dict[str, dict] = {}
    for r in rows:
        c = out.setdefault(r.study_uid, {"study_uid": r.study_uid, "patients": 0, "instances": 0, "parts": []})
        c["patients"] += 1
        c["instances"] += int(r.num_instances or 0)
        c["parts"].append({"patient": r.patient_id, "series": r.num_series, "instances": r.num_instances})
    return list(out.values())


def _dataset(meta_json: str | None):
    from pydicom import Dataset

    meta = orjson.loads(meta_json) if meta_json else {}
    meta = {k: v for k, v in meta.items() if "BulkDataURI" not in v and "InlineBinary" not in v}
    try:
        return Dataset.from_json(meta)
    except (ValueError, TypeError, KeyError):  # (a value pydicom cannot read back: fewer attributes)
        return Dataset()


def _rows_of(meta_json: str | None) -> tuple[dict, dict]:
    from mappings.dicom.attributes import index_rows

    study, series, _ = index_rows(_dataset(meta_json), blob_path="", size=0, transfer_syntax="", now=0.0,
                                  patient_id=None)
    return study, series


async def sync_parts(conn, st_rows: dict[str, dict], added: dict[str, list[dict]] | None) -> dict[str, list[str]]:
    """Keep the parts of the studies ``st_rows`` (study_uid → its row) in step after a STOW batch added the
    instance rows ``added`` (by study).  A study becomes conflicting when an added instance's patient differs
    from the study row's; one with parts already gets them rebuilt.  Returns the conflicting studies among
    them → their patient ids (the study row's first)."""
    uids = sorted(st_rows)
    new = {u for u, insts in (added or {}).items()
           if u in st_rows and any(i["patient_id"] != st_rows[u]["patient_id"] for i in insts)}
    have = set((await conn.execute(conflicting_stmt(), {"b_uids": uids})).scalars()) if uids else set()
    out: dict[str, list[str]] = {}
    for uid in sorted(new | have):
        patients = await rebuild(conn, uid, st_rows[uid])
        if len(patients) > 1:
            first = st_rows[uid]["patient_id"]
            out[uid] = sorted(patients, key=lambda p: (p != first, p))
    return out


async def rebuild(conn, uid: str, study_row: dict[str, Any]) -> list[str]:
    """Rebuild the parts of study ``uid`` from its instance rows; returns its patients (parts are removed
    when it holds one patient's instances only)."""
    await conn.execute(delete(dcm_study_part).where(dcm_study_part.c.study_uid == uid))
    await conn.execute(delete(dcm_series_part).where(dcm_series_part.c.study_uid == uid))
    I = dcm_instance.c
    insts = (await conn.execute(select(I.sop_uid, I.series_uid, I.patient_id, I.consent_no, I.metadata).where(
        I.study_uid == uid).order_by(I.stored_ts, I.sop_uid))).mappings().all()
    patients = list(dict.fromkeys(r["patient_id"] for r in insts))
    if len(patients) < 2:
        return patients
    series_rows = {r["series_uid"]: dict(r) for r in (await conn.execute(
        select(SE).where(SE.c.study_uid == uid))).mappings()}
    first: dict[tuple, dict] = {}  # (series, patient) → its first instance
    count: dict[tuple, int] = {}
    for r in insts:
        k = (r["series_uid"], r["patient_id"])
        first.setdefault(k, dict(r))
        count[k] = count.get(k, 0) + 1
    by_series: dict[str, list[str]] = {}
    for se, pid in first:
        by_series.setdefault(se, []).append(pid)
    series_parts: list[dict] = []
    modality: dict[tuple, str | None] = {}
    now = study_row.get("updated_ts") or 0.0
    for se, pids in by_series.items():
        for pid in pids:
            modality[(se, pid)] = (series_rows.get(se) or {}).get("modality")
        if len(pids) < 2:
            continue
        for pid in pids:
            row = first[(se, pid)]
            _, srow = _rows_of(row["metadata"])
            srow.update(series_uid=se, study_uid=uid, patient_id=pid, consent_no=row["consent_no"],
                        num_instances=count[(se, pid)], updated_ts=now)
            modality[(se, pid)] = srow.get("modality")
            series_parts.append(srow)
    study_parts: list[dict] = []
    for pid in patients:
        rep = next(r for r in insts if r["patient_id"] == pid)
        strow, _ = _rows_of(rep["metadata"])
        mine = [se for se, p in first if p == pid]
        strow.update(study_uid=uid, patient_id=pid, consent_no=rep["consent_no"], num_series=len(mine),
                     num_instances=sum(count[(se, pid)] for se in mine), updated_ts=now,
                     modalities="\\".join(sorted({m for se in mine if (m := modality[(se, pid)])})))
        study_parts.append(strow)
    await conn.execute(dcm_study_part.insert(), study_parts)
    if series_parts:
        await conn.execute(dcm_series_part.insert(), series_parts)
    return patients


async def subject_rows(conn, study_row: dict, series_rows: list[dict]) -> tuple[dict, list[dict]]:
    """For the ImagingStudy of a conflicting study: the study part of its subject (the study row's patient)
    and the series holding that patient's instances (a shared series as its part for that patient)."""
    uid, pid = study_row["study_uid"], study_row["patient_id"]
    part = (await conn.execute(select(dcm_study_part).where(
        dcm_study_part.c.study_uid == uid, dcm_study_part.c.patient_id == pid))).mappings().first()
    mine = set((await conn.execute(select(IN.c.series_uid).distinct().where(
        IN.c.study_uid == uid, IN.c.patient_id == pid))).scalars())
    shared = {r["series_uid"]: dict(r) for r in (await conn.execute(select(dcm_series_part).where(
        dcm_series_part.c.study_uid == uid, dcm_series_part.c.patient_id == pid))).mappings()}
    series = [shared.get(r["series_uid"], r) for r in series_rows if r["series_uid"] in mine]
    return (dict(part) if part else study_row), series


__all__ = ["study_view", "series_view", "sync_parts", "rebuild", "subject_rows", "has_conflicts_stmt",
           "conflicting_stmt", "list_conflicts"]


def study_uids_stmt():
    """Every stored Study Instance UID: the de-identified UID index (gateway.services.deid.UidIndex) maps a
    project's UIDs back to them; what a requester then gets is decided by the gated read that follows."""
    return built_once(("dicom_views.study_uids",), lambda: select(ST.c.study_uid))
