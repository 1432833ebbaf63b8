"""The DICOM index on the ingest side (STOW-RS, DIMSE C-STORE, ``fedgate import``): the statements of the
one write transaction per STOW batch — patient matching, index rows, study/series counts, SR/SEG content
rows and the FHIR ImagingStudy sync — and the system look-ups around it (already stored SOP instances,
the start-up reconcile of index rows with blob files).

Nothing here answers a requester: reads that return patient data to one are in
:mod:`gateway.store.dicom_reads`, built from an :class:`~gateway.store.access.Access`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import orjson
from sqlalchemy import bindparam, delete, func, or_, select, update

from gateway.store import dicom_views
from gateway.store import fhir_repo as repo
from gateway.store import schema as s
from gateway.store.db import Database, built_once, table_insert
from gateway.store.dicom_schema import dcm_instance, dcm_seg_segment, dcm_series, dcm_sr_item, dcm_study
from gateway.store.scope import NO_PATIENT, profile_no
from mappings.dicom import attributes as attrs
from mappings.dicom.imagingstudy import imaging_study_resource

#: PostgreSQL advisory lock key (one-key form) serialising STOW index transactions across server processes.
STOW_INDEX_LOCK = 0x570317

PatientKey = tuple[str | None, str | None]  # (PatientID, IssuerOfPatientID)


class IndexEntry(Protocol):
    """One parsed instance to index (the ingest service's outcome of a part)."""

    sop_uid: str | None
    study_uid: str | None
    series_uid: str | None
    rows: tuple | None  # (study, series, instance) index rows from parsing
    rel: str | None  # its blob path
    meta_json: str | None
    content: tuple[list, list]  # SR items, SEG segments
    patient_key: PatientKey


async def lock_stow(conn) -> None:
    """One STOW index transaction at a time across server processes (processes > 1), as SQLite's write
    lock file gives: the study/series upserts, count updates and the ImagingStudy read-modify-write must
    see every committed instance of the study (READ COMMITTED alone lets two transactions each miss the
    other's rows). Parsing and files stay parallel."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(STOW_INDEX_LOCK)))


async def patient_ids(conn, patients: Sequence[tuple[PatientKey, dict]]) -> tuple[dict[tuple, str], dict[str | None, int | None]]:
    """Common-model patient id per (PatientID, Issuer) of ``patients`` ((key, {"sex", "birth"}) pairs; the
    first pair of a key gives a created patient's attributes): a FHIR Patient with that identifier, or a
    DICOM-born patient (created here, consent recomputed in this transaction); and the consent number
    of each (read with :func:`~gateway.store.consent_schema.lock_patients`, which also tells which
    DICOM-born patients exist already)."""
    from gateway.store.consent_schema import lock_patients, patient_nos, recompute

    out: dict[tuple, str] = {}
    dicom_born: set[str] = set()
    for key in {k for k, _ in patients}:
        pid, issuer = key
        match = None
        if pid:
            q = built_once(("stow patient", bool(issuer)), lambda: _patient_match_stmt(bool(issuer)))
            rows = (await conn.execute(q, {"p_code": pid, "p_sys": issuer, "p_oid": f"urn:oid:{issuer}"}
                                       if issuer else {"p_code": pid})).scalars().all()
            match = rows[0] if len(rows) == 1 else None
        if match is None:
            match = attrs.dicom_patient_key(pid, issuer)
            dicom_born.add(match)
        out[key] = match
    known = await lock_patients(conn, out.values())
    created: list[str] = []
    for key, match in out.items():
        if match in dicom_born and match not in known and match not in created:
            pid, issuer = key
            meta = next(m for k, m in patients if k == key)
            birth = meta.get("birth")
            await conn.execute(s.cm_patient.insert().values(
                src_type="DICOM", src_id=f"DICOM/{match}", patient_id=match,
                identifiers=orjson.dumps([f"{issuer or ''}|{pid}"] if pid else []).decode(),
                birth_date=f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}" if birth and len(birth) == 8 else None,
                birth_year=int(birth[:4]) if birth and birth[:4].isdigit() else None,
                sex={"M": "male", "F": "female", "O": "other"}.get(meta.get("sex") or "", None),
            ))
            created.append(match)
    if created:
        await recompute(conn, created)
        return out, await patient_nos(conn, out.values())
    nos: dict[str | None, int | None] = {p: profile_no(known.get(p)) for p in out.values()}
    nos[None] = NO_PATIENT
    return out, nos


async def insert_batch(conn, entries: Sequence[IndexEntry], pids: dict[tuple, str],
                       nos: dict[str | None, int | None], now: float) -> set[str]:
    """Index rows, study/series counts and the FHIR ImagingStudy of a batch (distinct SOP Instance UIDs),
    on ``conn`` (one transaction, :func:`lock_stow` taken); returns the SOP Instance UIDs inserted — one
    missing was stored first by another request (nothing of it is written here).

    About 14 statements for a batch within one study: the study and series rows are inserted with ON
    CONFLICT DO NOTHING (first writer's attributes win) instead of being looked up first; the instance
    rows likewise, their RETURNING telling which SOP instances another request stored first (no separate
    look-up); counts are updated with one statement per table (the study's returning its row when the
    batch holds one study); the ImagingStudy is extended with the new instances instead of being rebuilt
    from every instance row (see :func:`sync_imaging_studies`) and written with only the index rows that
    changed (:func:`gateway.store.fhir_repo.apply_writes`)."""
    studies: dict[str, dict] = {}
    series: dict[str, dict] = {}
    instances: list[dict] = []
    for o in entries:
        pid = pids[o.patient_key]
        st, se, inst = (dict(r, patient_id=pid, consent_no=nos[pid]) for r in o.rows)
        st["updated_ts"] = se["updated_ts"] = now
        inst.update(blob_path=o.rel, stored_ts=now, metadata=o.meta_json)
        studies.setdefault(st["study_uid"], st | {"num_series": 0, "num_instances": 0})
        series.setdefault(se["series_uid"], se | {"num_instances": 0})
        instances.append(inst)
    if not instances:
        return set()
    # studies/series new to the store (first writer's attributes win; counts recomputed below)
    d = conn.dialect.name
    await conn.execute(built_once(("stow new", "study", d), lambda: _insert_new(conn, dcm_study, "study_uid")),
                       list(studies.values()))
    await conn.execute(built_once(("stow new", "series", d), lambda: _insert_new(conn, dcm_series, "series_uid")),
                       list(series.values()))
    # instances: one already stored (by a concurrent request since its duplicate check, or another process)
    # is skipped, and missing from RETURNING; its study and series rows exist (written with it)
    inserted = set((await conn.execute(built_once(("stow new", "instance", d), lambda: _insert_new(
        conn, dcm_instance, "sop_uid").returning(dcm_instance.c.sop_uid)), instances)).scalars())
    sr_rows: list[dict] = []
    seg_rows: list[dict] = []
    added: dict[str, list[dict]] = {}
    for o, inst in zip(entries, instances):
        if o.sop_uid not in inserted:
            continue
        sr, seg = o.content
        base = {"sop_uid": o.sop_uid, "patient_id": inst["patient_id"]}
        sr_rows.extend(base | r for r in sr)
        seg_rows.extend(base | {"study_uid": o.study_uid, "series_uid": o.series_uid} | r for r in seg)
        added.setdefault(o.study_uid, []).append(inst)
    if not inserted:
        return inserted
    if sr_rows:
        await conn.execute(table_insert(dcm_sr_item), sr_rows)
    if seg_rows:
        await conn.execute(table_insert(dcm_seg_segment), seg_rows)
    i, se_t, st_t = dcm_instance.c, dcm_series.c, dcm_study.c
    # concurrent writers of the same study (other processes) are serialised by STOW_INDEX_LOCK above
    # (PostgreSQL) or the write lock file (SQLite), so the counts, series and ImagingStudy read below
    # include their rows
    touched = sorted({inst["series_uid"] for insts in added.values() for inst in insts})
    await conn.execute(built_once(("stow series counts",), lambda: update(dcm_series).where(
        se_t.series_uid.in_(bindparam("b_series", expanding=True))).values(
        num_instances=select(func.count()).where(i.series_uid == se_t.series_uid).scalar_subquery(),
        updated_ts=bindparam("b_now"))), {"b_series": touched, "b_now": now})
    ser_rows = (await conn.execute(built_once(("stow series of studies",), lambda: select(dcm_series).where(
        se_t.study_uid.in_(bindparam("b_studies", expanding=True))).order_by(se_t.series_number)),
        {"b_studies": list(added)})).mappings().all()
    by_study: dict[str, list[dict]] = {u: [] for u in added}
    for r in ser_rows:
        by_study[r["study_uid"]].append(dict(r))
    counts = built_once(("stow study counts",), lambda: update(dcm_study).where(
        st_t.study_uid == bindparam("b_uid")).values(
        num_instances=select(func.count()).where(i.study_uid == st_t.study_uid).scalar_subquery(),
        num_series=bindparam("b_n"), modalities=bindparam("b_mods"), updated_ts=bindparam("b_now")))
    params = [{"b_uid": u, "b_n": len(rows), "b_now": now,
               "b_mods": "\\".join(sorted({r["modality"] for r in rows if r["modality"]}))}
              for u, rows in by_study.items()]
    st_rows = None
    if len(params) == 1:  # the usual batch: one study, whose updated row the ImagingStudy needs
        returning = built_once(("stow study counts returning",), lambda: counts.returning(*dcm_study.c))
        st_rows = {r["study_uid"]: dict(r) for r in (await conn.execute(returning, params[0])).mappings()}
    else:  # (no RETURNING for an executemany UPDATE): read after
        await conn.execute(counts, params)
    await sync_imaging_studies(conn, by_study, added, st_rows)
    return inserted


async def sync_imaging_studies(conn, series_by_study: dict[str, list[dict]],
                               added: dict[str, list[dict]] | None = None,
                               st_rows: dict[str, dict] | None = None) -> None:
    """Write/update the FHIR ImagingStudy of each study (id = the Study Instance UID) from the index rows
    (``series_by_study``: each study's series rows, ordered by series number; ``st_rows``: the study rows,
    read here when not given).

    ``added``: the instance rows this transaction inserted, by study. The current version is then
    extended with them instead of reading every instance row of the study again (a cost growing with the
    study) — only if that version is exactly what the
    index rows give (the resource built from the study and series rows and its own instance list equals
    it: not edited over FHIR) and the extended list has as many instances as the index counts (no rows
    removed behind it, e.g. by the start-up reconcile); otherwise it is rebuilt in full. The
    result is the full rebuild's: instances ordered by instance number as the engine's ORDER BY orders
    them (NULL first on SQLite, last on PostgreSQL), equal numbers in the order they were stored."""
    uids = list(series_by_study)
    if st_rows is None:
        st_rows = {r["study_uid"]: dict(r) for r in (await conn.execute(
            select(dcm_study).where(dcm_study.c.study_uid.in_(uids)))).mappings()}
    # studies holding instances of several patients: per-patient parts for research answers;
    # their ImagingStudy lists only its subject's (the study row's patient's) series and instances
    conflicts = await dicom_views.sync_parts(conn, st_rows, added)
    await repo.lock_resources(conn, [("ImagingStudy", u) for u in uids])  # vs. FHIR API writers
    current = await repo.get_current_many(conn, [("ImagingStudy", u) for u in uids] + [("Endpoint", "dicomweb")])
    nulls_first = conn.dialect.name != "postgresql"
    inst_by_study: dict[str, list[dict]] = {}
    for uid in uids:
        if uid in conflicts:
            continue  # rebuilt below, from its subject's instances only
        merged = _extended_instances(current.get(("ImagingStudy", uid)), st_rows[uid], series_by_study[uid],
                                     (added or {}).get(uid), nulls_first)
        if merged is not None:
            inst_by_study[uid] = merged
    rebuild = [u for u in uids if u not in inst_by_study]
    if rebuild:
        inst = (await conn.execute(select(
            dcm_instance.c.study_uid, dcm_instance.c.series_uid, dcm_instance.c.sop_uid,
            dcm_instance.c.sop_class_uid, dcm_instance.c.instance_number, dcm_instance.c.patient_id).where(
            dcm_instance.c.study_uid.in_(rebuild))
            .order_by(dcm_instance.c.instance_number))).mappings().all()
        for u in rebuild:
            inst_by_study[u] = []
        for r in inst:
            if r["study_uid"] not in conflicts or r["patient_id"] == st_rows[r["study_uid"]]["patient_id"]:
                inst_by_study[r["study_uid"]].append({k: v for k, v in r.items() if k != "patient_id"})
    writes = []
    for uid in uids:
        series_rows = series_by_study[uid]
        study_row = st_rows[uid]
        if uid in conflicts:  # the subject's part: its own series (a shared series as its instances give it)
            study_row, series_rows = await dicom_views.subject_rows(conn, st_rows[uid], series_rows)
        resource = imaging_study_resource(study_row, series_rows, inst_by_study[uid])
        prev = current.get(("ImagingStudy", resource["id"]))
        # linked to the study's patient even when the subject names it by DICOM identifier only
        pid = st_rows[uid].get("patient_id")
        writes.append(repo.Write("ImagingStudy", resource["id"], resource, prev, "PUT" if prev else "POST",
                                 links=frozenset({pid}) if pid else frozenset(), derived=True))
    if ("Endpoint", "dicomweb") not in current:
        from mappings.dicom.imagingstudy import endpoint_resource

        writes.append(repo.Write("Endpoint", "dicomweb", endpoint_resource(), None, "POST"))
    await repo.apply_writes(conn, writes)


def _extended_instances(prev: "repo.Stored | None", study: dict, series: list[dict], added: list[dict] | None,
                        nulls_first: bool) -> list[dict] | None:
    """The instance rows of a study for :func:`imaging_study_resource`: those listed in its current
    ImagingStudy ``prev`` plus ``added``, in the full rebuild's order — or None when ``prev`` cannot be
    trusted to list exactly the stored instances (see :func:`sync_imaging_studies`)."""
    if added is None or prev is None or prev.deleted or not prev.content:
        return None
    old = prev.resource()
    old.pop("meta", None)
    listed: list[dict] = []
    for se in old.get("series") or []:
        for item in se.get("instance") or []:
            code = (item.get("sopClass") or {}).get("code") or ""
            listed.append({"series_uid": se.get("uid"), "sop_uid": item.get("uid"),
                           "sop_class_uid": code[8:] if code.startswith("urn:oid:") else code,
                           "instance_number": item.get("number")})
    known = {se.get("uid") for se in old.get("series") or []}
    if imaging_study_resource(study, [r for r in series if r["series_uid"] in known], listed) != old:
        return None  # edited over FHIR, or study/series rows differ from what it was built from
    merged = listed + [{k: r[k] for k in ("series_uid", "sop_uid", "sop_class_uid", "instance_number")} for r in added]
    if len(merged) != study["num_instances"]:
        return None  # instance rows removed (or added) behind the ImagingStudy's back
    # a stable sort: the listed instances are in this order already, new ones go after equal numbers
    return sorted(merged, key=lambda r: ((r["instance_number"] is None) != nulls_first, r["instance_number"] or 0))


def _patient_match_stmt(with_issuer: bool):
    """FHIR Patients with a DICOM PatientID (``p_code``) as identifier, under the issuer's system (``p_sys``
    or ``p_oid``) when ``with_issuer``; distinct: a Patient may carry the same value under several systems."""
    t, r = s.idx_token, s.fhir_resource
    q = select(r.c.res_id).distinct().join(t, t.c.rid == r.c.rid).where(
        t.c.res_type == "Patient", t.c.param == "identifier", t.c.code == bindparam("p_code"), r.c.deleted.is_(False))
    if with_issuer:
        q = q.where(or_(t.c.system == bindparam("p_sys"), t.c.system == bindparam("p_oid")))
    return q.limit(2)


def _insert_new(conn, table, key: str):
    """INSERT that skips rows whose primary key exists already (SQLite and PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing(index_elements=[table.c[key]])



# ------------------------------------------------------------------------- system look-ups (not a requester's read)
async def stored_blob_paths(db: Database, uids: Sequence[str]) -> dict[str, str]:
    """Blob path of each already stored SOP Instance UID among ``uids`` (the STOW duplicate check)."""
    existing: dict[str, str] = {}
    for i in range(0, len(uids), 50):
        chunk = uids[i:i + 50]
        # one statement per list length, so Database.read_rows compiles it once
        stmt = built_once(("stow dup", len(chunk)), lambda: select(
            dcm_instance.c.sop_uid, dcm_instance.c.blob_path).where(
            dcm_instance.c.sop_uid.in_([bindparam(f"u{j}") for j in range(len(chunk))])))
        rows = await db.read_rows(stmt, {f"u{j}": u for j, u in enumerate(chunk)})
        existing.update((r["sop_uid"], r["blob_path"]) for r in rows)
    return existing


async def indexed_among(db: Database, rels: Sequence[str]) -> set[str]:
    """Those of the blob paths ``rels`` that have an index row."""
    found: set[str] = set()
    for i in range(0, len(rels), 200):
        chunk = rels[i:i + 200]
        async with db.read() as conn:
            found |= set((await conn.execute(select(dcm_instance.c.blob_path).where(
                dcm_instance.c.blob_path.in_(chunk)))).scalars())
    return found


async def indexed_blob_paths(db: Database) -> set[str]:
    """Every blob path with an index row (the start-up reconcile)."""
    async with db.read() as conn:
        return set((await conn.execute(select(dcm_instance.c.blob_path))).scalars())


async def drop_rows_of_missing_files(db: Database, missing: set[str]) -> None:
    """Index and content rows of the instances whose blob files are gone."""
    async with db.write() as conn:
        gone = (await conn.execute(select(dcm_instance.c.sop_uid, dcm_instance.c.study_uid).where(
            dcm_instance.c.blob_path.in_(sorted(missing))))).all()
        sops = [g.sop_uid for g in gone]
        for table in (dcm_sr_item, dcm_seg_segment):
            await conn.execute(delete(table).where(table.c.sop_uid.in_(sops)))
        await conn.execute(delete(dcm_instance).where(dcm_instance.c.sop_uid.in_(sops)))


__all__ = ["IndexEntry", "STOW_INDEX_LOCK", "drop_rows_of_missing_files", "indexed_among", "indexed_blob_paths",
           "insert_batch", "lock_stow", "patient_ids", "stored_blob_paths", "sync_imaging_studies"]
