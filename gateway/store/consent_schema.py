"""Consent tables and the per-patient effective-profile recomputation.

* ``consent_profile``: content-addressed effective profiles (key = SHA-256 of the canonical JSON);
  ``cm_patient.consent_profile`` points here.  Rows are never updated, so the gate may cache them.
* ``consent_policy``: the site policy document in force (one row), so that recomputation inside any
  write transaction sees the same policy the gate was started with.

:func:`recompute` runs in the caller's transaction whenever a Patient or Consent is written
(``fhir_repo.apply_writes``), so a withdrawal takes effect on the very next request.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import orjson
from sqlalchemy import Column, Index, Integer, String, Table, Text, bindparam, inspect, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store import schema as s
from gateway.store.db import built_once, table_insert
from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_study
from gateway.store.scope import NO_PATIENT, profile_no
from mappings.fhir.consent_duo import (
    effective,
    entry_from_consent,
    parse_policy,
    profile_key,
)

consent_profile = Table(
    "consent_profile",
    s.metadata,
    Column("key", String(64), primary_key=True),
    Column("profile", Text, nullable=False),
)

#: The gate's SQL is ``cm_patient.consent_profile IN (...)``.
ix_consent_profile = Index("ix_cm_patient_consent_profile", s.cm_patient.c.consent_profile)


#: ``consent_no`` indexes on the DICOM levels: a gated QIDO count is then an index-only seek per allowed
#: number, like the ungated count (a covering-index scan), instead of a table scan.
DICOM_CONSENT_INDEXES = tuple(Index(f"ix_{t.name}_consent_no", t.c.consent_no)
                              for t in (dcm_study, dcm_series, dcm_instance))


def index_tables() -> tuple:
    """The FHIR search-index tables (``idx_*``): their rows carry their resource's ``consent_no`` (kept
    equal to ``fhir_resource.consent_no`` by rid, in the same transactions), so a gated search tests
    consent inside the index lookup that drives it (``fhir_repo.search``, ``schema.GATE_INDEXES``)."""
    return tuple(s.INDEX_TABLES.values())


def stamped_tables() -> tuple:
    """Tables whose rows carry ``consent_no``, the number (:func:`gateway.store.scope.profile_no`) of
    their patient's ``cm_patient.consent_profile`` (``NO_PATIENT`` without a patient), so the gate
    filters on the row itself (``AccessScope.row_clause``) instead of a per-row patient subquery."""
    from gateway.store.dicom_schema import dcm_series_part, dcm_study_part

    return (s.fhir_resource, dcm_study, dcm_series, dcm_instance, dcm_study_part, dcm_series_part)


async def _stamp_all(conn: AsyncConnection, table) -> None:
    """Back-fill ``consent_no`` of every row of ``table`` from ``cm_patient`` (one statement per
    distinct profile: their number is computed here, not in SQL)."""
    P = s.cm_patient
    await conn.execute(update(table).where(table.c.patient_id.is_(None)).values(consent_no=NO_PATIENT))
    await conn.execute(update(table).where(table.c.patient_id.is_not(None)).values(consent_no=None))
    keys = (await conn.execute(select(P.c.consent_profile).where(P.c.consent_profile.is_not(None))
                               .distinct())).scalars().all()
    for key in keys:
        pids = select(P.c.patient_id).where(P.c.consent_profile == key)
        await conn.execute(update(table).where(table.c.patient_id.in_(pids)).values(consent_no=profile_no(key)))


def _resource_consent_no(table):
    """The ``consent_no`` of the resource a row of the search-index table ``table`` belongs to."""
    R = s.fhir_resource
    return select(R.c.consent_no).where(R.c.rid == table.c.rid).scalar_subquery()


async def _stamp_index(conn: AsyncConnection, table) -> None:
    """Copy ``consent_no`` onto every row of the search-index table ``table`` from its resource (back-fill;
    :func:`_stamp_index_stmt` does it for some patients)."""
    await conn.execute(update(table).values(consent_no=_resource_consent_no(table)))


def _stamp_stmt(table):
    """``consent_no = :b_no`` on the rows of ``table`` whose patient is in ``:b_ids`` (built once: it runs in
    every write transaction that creates a patient, e.g. STOW's first instance of a new one, where building
    and compiling a statement per call cost more than running it)."""
    return built_once(("stamp by patients", table.name), lambda: update(table).where(
        table.c.patient_id.in_(bindparam("b_ids", expanding=True))).values(consent_no=bindparam("b_no")))


def _stamp_index_stmt(table):
    """:func:`_stamp_index` for the resources of the patients in ``:b_ids`` (built once)."""
    R = s.fhir_resource
    return built_once(("stamp index by patients", table.name), lambda: update(table).where(
        table.c.rid.in_(select(R.c.rid).where(R.c.patient_id.in_(bindparam("b_ids", expanding=True))))).values(
        consent_no=_resource_consent_no(table)))


async def ensure_indexes(conn: AsyncConnection) -> None:
    """Bring stores created before these existed up to date (create_all skips existing tables): the
    consent index, the stamped ``consent_no`` columns (added and back-filled) and the gate indexes of
    the search-index tables."""
    def sync_step(sync) -> list[str]:
        ix_consent_profile.create(sync, checkfirst=True)
        added = []
        for table in stamped_tables() + index_tables():
            cols = {c["name"] for c in inspect(sync).get_columns(table.name)}
            if "consent_no" not in cols:
                sync.execute(text(f"ALTER TABLE {table.name} ADD COLUMN consent_no BIGINT"))
                added.append(table.name)
        cols = {c["name"] for c in inspect(sync).get_columns(s.fhir_resource.name)}
        if "multi_link" not in cols:
            sync.execute(text(f"ALTER TABLE {s.fhir_resource.name} ADD COLUMN multi_link BOOLEAN"))
        for ix in DICOM_CONSENT_INDEXES:
            ix.create(sync, checkfirst=True)
        for ix in s.GATE_INDEXES + s.LATER_INDEXES:
            ix.create(sync, checkfirst=True)
        return added

    added = await conn.run_sync(sync_step)
    for table in stamped_tables():
        if table.name in added:
            await _stamp_all(conn, table)
    for table in index_tables():
        if table.name in added or s.fhir_resource.name in added:
            await _stamp_index(conn, table)
    await _backfill_links(conn)
    if conn.dialect.name == "postgresql":
        # No planner statistics on consent_no: its values are opaque numbers, and estimating
        # `consent_no IN (~100 numbers)` against a 100-entry MCV list cost more planning per statement
        # than executing the filter.  (The
        # search-index tables keep theirs: there the gate is part of the lookup that sizes the join of a
        # search, and without them PostgreSQL under-estimates the permitted rows several-fold and probes
        # fhir_resource once per candidate instead of hashing — slower than the ungated search.)
        for table in stamped_tables():
            target = (await conn.execute(text(
                "SELECT attstattarget FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) "
                "AND attname = 'consent_no'"), {"t": table.name})).scalar()
            if target != 0:
                await conn.execute(text(f"ALTER TABLE {table.name} ALTER COLUMN consent_no SET STATISTICS 0"))


async def _backfill_links(conn: AsyncConnection) -> None:
    """Compute the patient links of every stored version once, for stores written before them
    (marked done by the ``fhir_link`` row of ``schema_version``)."""
    V = s.schema_version
    done = (await conn.execute(select(V.c.version).where(V.c.component == "fhir_link"))).first()
    if done is not None:
        return
    from gateway.store.fhir_repo import relink

    await relink(conn)
    await conn.execute(V.insert().values(component="fhir_link", version=1))


async def lock_patients(conn: AsyncConnection, patient_ids: Iterable[str]) -> dict[str, str | None]:
    """The current consent profile key of each patient, read with a share lock on its ``cm_patient``
    rows (PostgreSQL; SQLite writes are serialised anyway).  Writers that stamp new rows call this
    first: a concurrent :func:`recompute` (which updates ``cm_patient`` before the stamped tables)
    then waits for them and restamps their rows, or they wait for it and read its new key — so a
    withdrawal can never be undone by a row stamped with the old key."""
    P = s.cm_patient
    ids = sorted({p for p in patient_ids if p})
    out: dict[str, str | None] = {}
    stmt = built_once(("lock patients",), lambda: select(P.c.patient_id, P.c.consent_profile).where(
        P.c.patient_id.in_(bindparam("b_ids", expanding=True))).order_by(P.c.patient_id).with_for_update(read=True))
    for i in range(0, len(ids), 500):
        rows = (await conn.execute(stmt, {"b_ids": ids[i:i + 500]})).all()
        for pid, key in rows:
            if out.get(pid) is None:
                out[pid] = key
    return out


async def patient_nos(conn: AsyncConnection, patient_ids: Iterable[str | None]) -> dict[str | None, int | None]:
    """``consent_no`` to stamp on new rows of these patients (None → ``NO_PATIENT``), via
    :func:`lock_patients`."""
    ids = set(patient_ids)
    keys = await lock_patients(conn, ids)
    out: dict[str | None, int | None] = {pid: profile_no(keys.get(pid)) for pid in ids if pid is not None}
    out[None] = NO_PATIENT
    return out


consent_policy = Table(
    "consent_policy",
    s.metadata,
    Column("id", Integer, primary_key=True),
    Column("document", Text, nullable=False),
)


async def stamp_resources(conn: AsyncConnection, written: list[tuple[int, str | None]]) -> None:
    """Stamp newly written resource rows ``(rid, patient_id)`` with their patient's current
    ``consent_no`` (``NO_PATIENT`` for resources outside any patient compartment).  Their search-index
    rows are written afterwards with the stamped number (``fhir_repo.apply_writes``)."""
    R = s.fhir_resource
    for i in range(0, len(written), 500):
        chunk = written[i:i + 500]
        nos = await patient_nos(conn, {pid for _, pid in chunk})
        by_no: dict[int | None, list[int]] = {}
        for rid, pid in chunk:
            by_no.setdefault(nos[pid], []).append(rid)
        stmt = built_once(("stamp resources",), lambda: update(R).where(
            R.c.rid.in_(bindparam("b_rids", expanding=True))).values(consent_no=bindparam("b_no")))
        for no, rids in by_no.items():
            await conn.execute(stmt, {"b_rids": rids, "b_no": no})


def combined_key(keys: Iterable[str]) -> str:
    """The key of the *combined* profile of a resource linked to patients with several distinct effective
    profiles: SHA-256 of the sorted member keys.  Its ``consent_profile`` row holds
    ``{"all_of": [keys]}``; the gate permits it only when it permits every member."""
    import hashlib

    members = sorted(set(keys))
    return hashlib.sha256(("all_of:" + ",".join(members)).encode()).hexdigest()


def combined_doc(keys: Iterable[str]) -> str:
    return orjson.dumps({"all_of": sorted(set(keys))}, option=orjson.OPT_SORT_KEYS).decode()


async def linked_nos(conn: AsyncConnection, links: dict[int, frozenset[str]]) -> dict[int, int | None]:
    """``consent_no`` of resources from their patient links (``rid`` → patient ids): ``NO_PATIENT`` with
    none; NULL when a linked patient has no effective profile (or is no patient at all:
    ``mappings.fhir.links.UNKNOWN``); the common profile's number when they share one; else the number of
    their combined profile (:func:`combined_key`, stored here when new).  Patients read with
    :func:`lock_patients` (a concurrent recompute then restamps these rows, or they see its result)."""
    keys = await lock_patients(conn, {p for ps in links.values() for p in ps})
    out: dict[int, int | None] = {}
    combos: dict[str, str] = {}
    for rid, pids in links.items():
        if not pids:
            out[rid] = NO_PATIENT
            continue
        ks = {keys.get(p) for p in pids}
        if None in ks:
            out[rid] = None
        elif len(ks) == 1:
            out[rid] = profile_no(next(iter(ks)))
        else:
            ck = combined_key(ks)
            combos.setdefault(ck, combined_doc(ks))
            out[rid] = profile_no(ck)
    if combos:
        known_q = built_once(("profiles known",), lambda: select(consent_profile.c.key).where(
            consent_profile.c.key.in_(bindparam("b_keys", expanding=True))))
        have = set((await conn.execute(known_q, {"b_keys": sorted(combos)})).scalars())
        missing = [{"key": k, "profile": v} for k, v in combos.items() if k not in have]
        if missing:
            await conn.execute(table_insert(consent_profile), missing)
    return out


async def stamp_linked(conn: AsyncConnection, links: dict[int, frozenset[str]]) -> None:
    """Stamp resource rows (``rid`` → patient links) whose ``consent_no`` comes from several links
    (``fhir_resource.multi_link``), and copy the stamp onto their search-index rows."""
    if not links:
        return
    R = s.fhir_resource
    nos = await linked_nos(conn, links)
    by_no: dict[int | None, list[int]] = {}
    for rid, no in nos.items():
        by_no.setdefault(no, []).append(rid)
    stmt = built_once(("stamp resources",), lambda: update(R).where(
        R.c.rid.in_(bindparam("b_rids", expanding=True))).values(consent_no=bindparam("b_no")))
    for no, rids in by_no.items():
        for i in range(0, len(rids), 500):
            await conn.execute(stmt, {"b_rids": rids[i:i + 500], "b_no": no})
    rids = sorted(links)
    for i in range(0, len(rids), 500):
        for table in index_tables():
            await conn.execute(built_once(("stamp index by rids", table.name), lambda: update(table).where(
                table.c.rid.in_(bindparam("b_rids", expanding=True))).values(
                consent_no=_resource_consent_no(table))), {"b_rids": rids[i:i + 500]})


async def current_links(conn: AsyncConnection, rids: Iterable[int] | None = None, *,
                        patients: Iterable[str] | None = None) -> dict[int, frozenset[str]]:
    """Patient links of current multi-link resources: by ``rids``, or those linked to any of ``patients``."""
    R, L = s.fhir_resource, s.fhir_link
    on = (L.c.res_type == R.c.res_type) & (L.c.res_id == R.c.res_id) & (L.c.version == R.c.version)
    out: dict[int, set[str]] = {}
    if patients is not None:
        ids = sorted(set(patients))
        found: set[int] = set()
        stmt = built_once(("multi rows of patients",), lambda: select(R.c.rid).join(L, on).where(
            L.c.patient_id.in_(bindparam("b_ids", expanding=True)), R.c.multi_link.is_(True)))
        for i in range(0, len(ids), 500):
            found.update((await conn.execute(stmt, {"b_ids": ids[i:i + 500]})).scalars())
        rids = found
    rids = sorted(set(rids or ()))
    stmt = built_once(("links of rows",), lambda: select(R.c.rid, L.c.patient_id).join(L, on).where(
        R.c.rid.in_(bindparam("b_rids", expanding=True))))
    for i in range(0, len(rids), 500):
        for rid, pid in await conn.execute(stmt, {"b_rids": rids[i:i + 500]}):
            out.setdefault(rid, set()).add(pid)
    return {rid: frozenset(out.get(rid, ())) for rid in rids}


async def stamp_dicom(conn: AsyncConnection, patient_ids: Iterable[str] | None = None) -> None:
    """Re-stamp DICOM index rows (study/series/instance) of ``patient_ids`` (None: all) from
    ``cm_patient`` — for bulk loaders that write those tables directly."""
    if patient_ids is None:
        for table in stamped_tables()[1:]:
            await _stamp_all(conn, table)
        return
    ids = sorted({p for p in patient_ids if p})
    for i in range(0, len(ids), 500):
        nos = await patient_nos(conn, ids[i:i + 500])
        by_no: dict[int | None, list[str]] = {}
        for pid in ids[i:i + 500]:
            by_no.setdefault(nos[pid], []).append(pid)
        for no, pids in by_no.items():
            for table in stamped_tables()[1:]:
                await conn.execute(_stamp_stmt(table), {"b_ids": pids, "b_no": no})


async def load_policy_doc(conn: AsyncConnection) -> dict:
    stmt = built_once(("policy doc",), lambda: select(consent_policy.c.document).where(consent_policy.c.id == 1))
    row = (await conn.execute(stmt)).first()
    return orjson.loads(row[0]) if row else {}


async def store_policy_doc(conn: AsyncConnection, doc: dict) -> bool:
    """Store the policy document; True when it changed (callers then recompute every patient)."""
    text = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()
    row = (await conn.execute(select(consent_policy.c.document).where(consent_policy.c.id == 1))).first()
    if row and row[0] == text:
        return False
    if row:
        await conn.execute(update(consent_policy).where(consent_policy.c.id == 1).values(document=text))
    else:
        await conn.execute(consent_policy.insert().values(id=1, document=text))
    return True


async def recompute(conn: AsyncConnection, patient_ids: Iterable[str] | None, *,
                    unindexed: Collection[int] = ()) -> int:
    """Recompute ``cm_patient.consent_profile`` for ``patient_ids`` (None: every patient), whatever
    the row's source (FHIR, OMOP import, ...): Consents are FHIR resources of that patient id; site
    policy collections match the row's identifiers / sex / birth year.  ``unindexed``: rids of resource
    rows that have no search-index rows yet (inserted in this transaction; ``fhir_repo.apply_writes``
    writes their index rows afterwards, with the new stamp): the index restamp leaves them out."""
    P, R = s.cm_patient, s.fhir_resource
    ids = None if patient_ids is None else sorted({p for p in patient_ids if p})
    if ids is not None and not ids:
        return 0
    collections = parse_policy(await load_policy_doc(conn))
    # (statements built once, with the patient list as an expanding parameter: see _stamp_stmt)
    def of_ids(q, column):
        return q if ids is None else q.where(column.in_(bindparam("b_ids", expanding=True)))

    wp = built_once(("recompute patients", ids is None), lambda: of_ids(
        select(P.c.patient_id, P.c.identifiers, P.c.sex, P.c.birth_year), P.c.patient_id))
    wc = built_once(("recompute consents", ids is None), lambda: of_ids(select(R.c.patient_id, R.c.content).where(
        R.c.res_type == "Consent", R.c.deleted.is_(False)), R.c.patient_id))
    patients: list = []
    consents: dict[str, list] = {}
    for chunk in ([ids[i:i + 500] for i in range(0, len(ids), 500)] if ids is not None else [None]):
        params = None if chunk is None else {"b_ids": chunk}
        patients.extend((await conn.execute(wp, params)).all())
        for pid, content in (await conn.execute(wc, params)).all():
            if pid is not None and content:
                consents.setdefault(pid, []).append(orjson.loads(content))
    if not patients:
        return 0
    known = set()
    by_key: dict[str | None, list[str]] = {}
    new_profiles: dict[str, str] = {}
    for pid, identifiers, sex, birth_year in patients:
        entries, opt_out = [], False
        for res in consents.get(pid, ()):
            got = entry_from_consent(res)
            if got is False:
                opt_out = True
            elif got is not None:
                entries.append(got)
        idents = orjson.loads(identifiers) if identifiers else []
        entries.extend(c.entry() for c in collections if c.matches(idents, sex, birth_year))
        doc = effective(entries, opt_out)
        key = profile_key(doc) if doc is not None else None
        if key is not None and key not in known:
            known.add(key)
            new_profiles[key] = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()
        by_key.setdefault(key, []).append(pid)
    if new_profiles:
        known_q = built_once(("profiles known",), lambda: select(consent_profile.c.key).where(
            consent_profile.c.key.in_(bindparam("b_keys", expanding=True))))
        have = set((await conn.execute(known_q, {"b_keys": sorted(new_profiles)})).scalars())
        missing = [{"key": k, "profile": v} for k, v in new_profiles.items() if k not in have]
        if missing:
            await conn.execute(table_insert(consent_profile), missing)
    set_profile = built_once(("set consent profile",), lambda: update(P).where(
        P.c.patient_id.in_(bindparam("b_ids", expanding=True))).values(consent_profile=bindparam("b_key")))
    for key, pids in by_key.items():
        for i in range(0, len(pids), 500):
            # cm_patient first: stampers of new rows (lock_patients) wait on it or are waited for
            await conn.execute(set_profile, {"b_ids": pids[i:i + 500], "b_key": key})
            for table in stamped_tables():
                await conn.execute(_stamp_stmt(table), {"b_ids": pids[i:i + 500], "b_no": profile_no(key)})
    # the search-index rows of those resources: copied from fhir_resource (just restamped), one statement
    # per table for all the patients rather than one per profile
    everyone = sorted(p for pids in by_key.values() for p in pids)
    for i in range(0, len(everyone), 500):
        if not unindexed:
            for table in index_tables():
                await conn.execute(_stamp_index_stmt(table), {"b_ids": everyone[i:i + 500]})
            continue
        # the patients' other resources only, by rid (a patient's first write transaction has none: no
        # statement at all; before, one UPDATE per index table joined the patients' rows to it, which
        # PostgreSQL may plan as a scan of the whole index table as it grows)
        rids_q = built_once(("rids of patients",), lambda: select(R.c.rid).where(
            R.c.patient_id.in_(bindparam("b_ids", expanding=True))))
        rids = [r for r in (await conn.execute(rids_q, {"b_ids": everyone[i:i + 500]})).scalars()
                if r not in unindexed]
        for j in range(0, len(rids), 500):
            for table in index_tables():
                await conn.execute(built_once(("stamp index by rids", table.name), lambda: update(table).where(
                    table.c.rid.in_(bindparam("b_rids", expanding=True))).values(
                    consent_no=_resource_consent_no(table))), {"b_rids": rids[j:j + 500]})
    # resources linked to several patients (or to these through other links than patient_id): their stamp
    # is their patients' combined one
    await stamp_linked(conn, await current_links(conn, patients=everyone))
    return len(patients)


__all__ = ["combined_key", "current_links", "linked_nos", "stamp_linked",
           "consent_policy", "consent_profile", "index_tables", "load_policy_doc", "lock_patients", "patient_nos",
           "recompute", "stamp_dicom", "stamp_resources", "stamped_tables", "store_policy_doc"]
