"""Reads and writes of the OMOP export and import (``gateway.services.omop``).

Export: the common-model rows, DICOM series and SR measurements of the patients a consent scope admits.
Every function that reads patient rows takes the requester's :class:`AccessScope` (from the gate,
``AccessLayer.open``) as a required argument — there is no unscoped variant.  Import: the diff of an OMOP
source against the rows imported from it earlier (``src_type = "OMOP"``), applied in one transaction.
"""

from __future__ import annotations

import orjson
from sqlalchemy import and_, bindparam, delete, select, update

from gateway.store import schema as s
from gateway.store.access import require_scope, where
from gateway.store.consent_schema import recompute as recompute_consent
from gateway.store.migrate import load_table_modules
from gateway.store.scope import AccessScope
from mappings.dicom.urls import DicomwebUrls
from mappings.omop import importer as imp
from mappings.omop.export import CmData, ImagingSeries, SrMeasurement

#: image_occurrence.wadors_uri: root-relative, as the OMOP export has always written it
_WADO = DicomwebUrls("/dicomweb")

CHUNK = 5_000
_EVENT = ("pk", "src_type", "src_id", "patient_id", "system", "code", "encounter_id")
#: The common-model columns the OMOP mapping reads (mappings/omop/export.py).
EXPORT_COLUMNS = {
    "cm_patient": ("pk", "src_type", "src_id", "patient_id", "birth_date", "sex", "race", "ethnicity", "deceased_date",
                   "identifiers"),
    "cm_encounter": ("pk", "src_type", "src_id", "patient_id", "class_code", "code", "start", "end"),
    "cm_condition": _EVENT + ("onset", "abatement", "clinical_status"),
    "cm_observation": _EVENT + ("category", "value_num", "unit", "value_system", "value_code", "value_text", "effective"),
    "cm_procedure": _EVENT + ("performed", "performed_end"),
}


async def collect(db, scope: AccessScope) -> CmData:
    """Common-model rows of the patients in ``scope`` (plus their imaging series and SR values)."""
    require_scope(scope)
    load_table_modules()
    # the patients the gate admits (a SELECT of cm_patient ids; None = every patient); an empty
    # restricted scope selects nothing
    visible = None if scope.unrestricted else (
        select(s.cm_patient.c.patient_id).where(where(scope, s.cm_patient), s.cm_patient.c.patient_id.is_not(None)))

    def gated(table, cols=None):
        stmt = (select(*(table.c[c] for c in cols)) if cols else select(table)).where(table.c.patient_id.is_not(None))
        return stmt if visible is None else stmt.where(table.c.patient_id.in_(visible))

    data = CmData()
    async with db.read() as conn:
        if not db.is_sqlite:  # one snapshot for every table (SQLite's read transaction is one already)
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        for attr, table in (("patients", s.cm_patient), ("encounters", s.cm_encounter),
                            ("conditions", s.cm_condition), ("observations", s.cm_observation),
                            ("procedures", s.cm_procedure)):
            res = await conn.execute(gated(table, EXPORT_COLUMNS[table.name]))
            setattr(data, attr, [dict(r._mapping) for r in res])
        dicom = await _dicom_series(conn, visible)
        have = {x.study_uid for x in dicom}
        data.series = dicom + await _fhir_series(conn, scope, gated(s.cm_imaging_study), have)
        data.sr_items = await _sr_items(conn, visible)
    return data


async def _dicom_series(conn, visible) -> list[ImagingSeries]:
    st, se = s.metadata.tables.get("dcm_study"), s.metadata.tables.get("dcm_series")
    if st is None or se is None:
        return []
    # per-patient rows: a study or series holding instances of several patients gives one
    # row per patient, built from that patient's instances, gated by that patient
    from gateway.store import dicom_views

    st, se = dicom_views.study_view(), dicom_views.series_view()
    stmt = (select(se.c.series_uid, se.c.study_uid, se.c.modality, se.c.body_part, se.c.series_date,
                   st.c.study_date, se.c.patient_id)
            .join(st, and_(st.c.study_uid == se.c.study_uid, st.c.patient_id == se.c.patient_id))
            .where(se.c.patient_id.is_not(None)))
    if visible is not None:
        stmt = stmt.where(se.c.patient_id.in_(visible))
    return [ImagingSeries(r.patient_id, r.study_uid, r.series_uid, r.series_date or r.study_date, r.modality,
                          (r.body_part or "").upper() or None,
                          _WADO.series(r.study_uid, r.series_uid))
            for r in await conn.execute(stmt)]


async def _fhir_series(conn, scope: AccessScope, stmt, skip: set[str]) -> list[ImagingSeries]:
    """FHIR-born imaging studies: their series from the stored ImagingStudy JSON (read through the gate:
    an ImagingStudy linked to a refused patient gives no series detail)."""
    out: list[ImagingSeries] = []
    R = s.fhir_resource
    rows = [r for r in await conn.execute(stmt) if r.study_uid and r.study_uid not in skip]
    ids = [r.src_id.split("/", 1)[1] for r in rows if r.src_type == "fhir" and "/" in r.src_id]
    content: dict[str, dict] = {}
    for i in range(0, len(ids), 500):
        res = await conn.execute(select(R.c.res_id, R.c.content).where(
            R.c.res_type == "ImagingStudy", R.c.res_id.in_(ids[i:i + 500]), R.c.deleted.is_(False), where(scope, R)))
        content.update({r.res_id: orjson.loads(r.content) for r in res if r.content})
    # studies imported from OMOP: their series as imported (cm_imaging_series)
    omop = {r.study_uid for r in rows if r.src_type == "OMOP"}
    omop_series: dict[str, list] = {}
    if omop:
        ims = s.cm_imaging_series
        uids = sorted(omop)
        for i in range(0, len(uids), 500):
            res = await conn.execute(select(ims).where(ims.c.src_type == "OMOP", ims.c.study_uid.in_(uids[i:i + 500]),
                                                       where(scope, ims)))
            for x in res:
                omop_series.setdefault(x.study_uid, []).append(x)
    for r in rows:
        if r.study_uid in omop_series:
            for x in omop_series[r.study_uid]:
                if x.patient_id == r.patient_id:
                    out.append(ImagingSeries(r.patient_id, r.study_uid, x.series_uid or "", x.started or r.started,
                                             x.modality, x.body_part))
            continue
        res = content.get(r.src_id.split("/", 1)[-1]) or {}
        series = res.get("series") or []
        mods = orjson.loads(r.modalities) if r.modalities else []
        if not series:
            out.append(ImagingSeries(r.patient_id, r.study_uid, "", r.started, mods[0] if mods else None))
            continue
        for se in series:
            body = se.get("bodySite") or {}
            out.append(ImagingSeries(
                r.patient_id, r.study_uid, str(se.get("uid") or ""), se.get("started") or r.started,
                (se.get("modality") or {}).get("code"),
                None if body.get("system") == "http://snomed.info/sct" else body.get("code")))
    return out


async def _sr_items(conn, visible) -> list[SrMeasurement]:
    item, inst = s.metadata.tables.get("dcm_sr_item"), s.metadata.tables.get("dcm_instance")
    st = s.metadata.tables.get("dcm_study")
    if item is None or inst is None or st is None:
        return []
    ref = inst.alias("ref")
    # TID 1500 context: the algorithm name (DCM 111001, TID 4019) per SR, the finding (DCM 121071)
    # per measurement group
    algo: dict[str, str] = {}
    finding: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    ctx = select(item.c.sop_uid, item.c.group_item_id, item.c.concept_code, item.c.text_value,
                 item.c.code_scheme, item.c.code_value).where(
        item.c.concept_scheme == "DCM", item.c.concept_code.in_(("111001", "121071")))
    if visible is not None:
        ctx = ctx.where(item.c.patient_id.in_(visible))
    for r in await conn.execute(ctx):
        if r.concept_code == "111001" and r.text_value:
            algo.setdefault(r.sop_uid, r.text_value)
        elif r.concept_code == "121071" and r.code_value:
            finding.setdefault((r.sop_uid, r.group_item_id or ""), (r.code_scheme, r.code_value))
    # the image a measurement group refers to (SCOORD > IMAGE, or an IMAGE item of the group)
    group_series: dict[tuple[str, str], str] = {}
    gref = (select(item.c.sop_uid, item.c.group_item_id, inst.c.series_uid)
            .join(inst, inst.c.sop_uid == item.c.ref_sop_uid).where(item.c.ref_sop_uid.is_not(None))
            .order_by(item.c.id))
    if visible is not None:
        gref = gref.where(item.c.patient_id.in_(visible))
    for r in await conn.execute(gref):
        group_series.setdefault((r.sop_uid, r.group_item_id or ""), r.series_uid)
    stmt = (select(item.c.patient_id, item.c.concept_scheme, item.c.concept_code, item.c.concept_meaning,
                   item.c.sop_uid, item.c.group_item_id,
                   item.c.num_value, item.c.unit_code, inst.c.study_uid, inst.c.series_uid,
                   ref.c.series_uid.label("ref_series"), st.c.study_date)
            .join(inst, inst.c.sop_uid == item.c.sop_uid)
            .join(st, st.c.study_uid == inst.c.study_uid)
            .outerjoin(ref, ref.c.sop_uid == item.c.ref_sop_uid)
            .where(item.c.num_value.is_not(None), item.c.patient_id.is_not(None))
            .order_by(item.c.id))
    if visible is not None:
        stmt = stmt.where(item.c.patient_id.in_(visible))
    out = []
    for r in await conn.execute(stmt):
        f_scheme, f_code = finding.get((r.sop_uid, r.group_item_id or ""), (None, None))
        series = r.ref_series or group_series.get((r.sop_uid, r.group_item_id or "")) or r.series_uid
        out.append(SrMeasurement(r.patient_id, r.study_uid, series, r.study_date,
                                 r.concept_scheme, r.concept_code, r.concept_meaning, r.num_value, r.unit_code,
                                 f_scheme, f_code, algo.get(r.sop_uid)))
    return out


# ----------------------------------------------------------------------------------------------
# import (an admin's write; it reads only the rows an earlier import of the same source wrote)
# ----------------------------------------------------------------------------------------------


async def apply_import(db, rows: dict[str, list[dict]]) -> dict:
    """Insert, update and delete the ``src_type = "OMOP"`` rows so they equal ``rows``; counts per table."""
    stats: dict[str, dict[str, int]] = {}
    async with db.write() as conn:
        for name, new_rows in rows.items():
            table = s.metadata.tables[name]
            cols = [c for c in new_rows[0]] if new_rows else []
            content = [c for c in cols if c not in ("src_type", "src_id")]
            existing: dict[str, tuple] = {}
            res = await conn.execute(select(table.c.pk, table.c.src_id, *[table.c[c] for c in content])
                                     .where(table.c.src_type == imp.SRC))
            for r in res:
                existing[r.src_id] = tuple(r)
            inserts, updates, seen = [], [], set()
            for row in new_rows:
                seen.add(row["src_id"])
                old = existing.get(row["src_id"])
                if old is None:
                    inserts.append(row)
                elif tuple(old[2:]) != tuple(row[c] for c in content):
                    updates.append({"_pk": old[0], **{f"v_{c}": row[c] for c in content}})
            removed = [old[0] for sid, old in existing.items() if sid not in seen]
            for i in range(0, len(removed), CHUNK):
                await conn.execute(delete(table).where(table.c.pk.in_(removed[i:i + CHUNK])))
            if updates:
                stmt = update(table).where(table.c.pk == bindparam("_pk")).values(
                    {c: bindparam(f"v_{c}") for c in content})
                for i in range(0, len(updates), CHUNK):
                    await conn.execute(stmt, updates[i:i + CHUNK])
            await _insert(conn, table, inserts)
            stats[name] = {"inserted": len(inserts), "updated": len(updates), "deleted": len(removed),
                           "unchanged": len(new_rows) - len(inserts) - len(updates)}
        # imported patients get their effective consent profile (site policy) like FHIR-born ones
        changed = stats.get("cm_patient", {})
        if changed.get("inserted") or changed.get("updated"):
            await recompute_consent(conn, [r["patient_id"] for r in rows.get("cm_patient", ())])
    db.note_writes(sum(v["inserted"] + v["updated"] for v in stats.values()))
    return stats


async def linked_studies(db, uids: list[str]) -> int:
    """How many of the imported studies ``uids`` are also stored as DICOM (a count for the import report)."""
    st = s.metadata.tables.get("dcm_study")
    if st is None or not uids:
        return 0
    n = 0
    async with db.read() as conn:
        for i in range(0, len(uids), 500):
            res = await conn.execute(select(st.c.study_uid).where(st.c.study_uid.in_(uids[i:i + 500])))
            n += len(res.all())
    return n


async def _insert(conn, table, rows: list[dict]) -> None:
    """Bulk insert in the caller's transaction: COPY on PostgreSQL (asyncpg, same connection and
    transaction), executemany batches on SQLite."""
    if not rows:
        return
    if conn.dialect.name == "postgresql" and len(rows) >= 1000:
        cols = list(rows[0])
        raw = await conn.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(
            table.name, records=[tuple(r[c] for c in cols) for r in rows], columns=cols)
        return
    for i in range(0, len(rows), CHUNK):
        await conn.execute(table.insert(), rows[i:i + CHUNK])


__all__ = ["EXPORT_COLUMNS", "apply_import", "collect", "linked_studies"]
