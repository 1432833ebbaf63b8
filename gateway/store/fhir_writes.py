"""FHIR resource writes: new versions with their history, patient links, search-index and common-model rows
(only what differs from the previous version), the writers' advisory locks, and the rebuilds of derived
rows (``fedgate reindex``: :func:`reindex`, :func:`relink`).

All writes of one interaction (or one whole transaction Bundle) go through :func:`apply_writes` on a
connection from :meth:`Database.write`, so they commit or roll back together.

Part of the FHIR store (:mod:`gateway.store.fhir_repo` re-exports its public names)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import bindparam, delete, exists, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store import schema as s
from gateway.store.bulk_rows import insert_rows
from gateway.store.cm_rows import CM_BY_NAME, row_for
from gateway.store.db import built_once, fit_rows, table_insert, xact_lock
from gateway.store.fhir_reads import H, R, Stored, Write, links_of
from mappings.dates import now_instant
from mappings.fhir.index import compartment_patient, extract
from mappings.fhir.links import patient_links, primary_patient
from mappings.fhir.project import project

_IDX_COLS = {
    "token": ("param", "system", "code"),
    "string": ("param", "norm", "exact"),
    "date": ("param", "lo", "hi"),
    "reference": ("param", "target_type", "target_id"),
    "quantity": ("param", "value", "system", "code"),
}


def _derived(resource: dict[str, Any]) -> tuple[dict[str, list[tuple]], dict[str, list[tuple]]]:
    """The search index rows (by kind) and common-model rows (by table, as sorted item tuples) that a
    resource version has — a pure function of its content."""
    rows = extract(resource)
    idx = {k: v for k in _IDX_COLS if (v := getattr(rows, k))}
    cm: dict[str, list[tuple]] = {}
    for obj in project(resource):
        table, row = row_for(obj)
        cm.setdefault(table, []).append(tuple(sorted(row.items())))
    return idx, cm


#: ``_derived`` of recently written versions, by their JSON text (the text carries versionId and lastUpdated,
#: so an entry never goes stale): the next update of the same resource — a STOW adding instances to a
#: study rewrites its ImagingStudy each time — diffs against the previous version's rows without parsing
#: and re-extracting it. Per process, small.
_DERIVED_CACHE: "OrderedDict[str, tuple[dict, dict]]" = OrderedDict()
_DERIVED_CACHE_SIZE = 32


def _derived_of(content: str, resource: dict[str, Any] | None = None) -> tuple[dict[str, list[tuple]], dict[str, list[tuple]]]:
    """``_derived`` of the version whose JSON text is ``content`` (``resource``: that text parsed, if at hand),
    remembered for the next update of the resource (callers never modify the returned rows)."""
    hit = _DERIVED_CACHE.get(content)
    if hit is not None:
        _DERIVED_CACHE.move_to_end(content)
        return hit
    derived = _derived(resource if resource is not None else orjson.loads(content))
    _DERIVED_CACHE[content] = derived
    if len(_DERIVED_CACHE) > _DERIVED_CACHE_SIZE:
        _DERIVED_CACHE.popitem(last=False)
    return derived


def _row_diff(old: list[tuple], new: list[tuple]) -> tuple[bool, list[tuple]]:
    """(whether the old rows must be deleted, the rows to insert): unchanged → (False, []); only
    additions → (False, the added rows); anything removed or changed → (True, every new row)."""
    if not old:
        return False, list(new)
    if old == new:
        return False, []
    added = Counter(new)
    added.subtract(Counter(old))
    if any(n < 0 for n in added.values()):
        return True, list(new)
    out = []
    for r in new:
        if added[r] > 0:
            added[r] -= 1
            out.append(r)
    return False, out


class VersionConflict(Exception):
    """The row changed between read and write (concurrent update)."""


#: Class key of the per-resource PostgreSQL advisory locks (two-key form: apart from the audit chain's key).
RESOURCE_LOCK_CLASS = 0x46484952


async def lock_resources(conn: AsyncConnection, keys: Iterable[tuple[str, str]]) -> None:
    """Serialise writers of these resources until the transaction ends, across server processes, so a
    read of the current version followed by the write of the next one cannot interleave with another
    writer's (versions 1..n without gaps, duplicates or 409s; a first PUT never races another's insert).
    Call before reading the current versions.  PostgreSQL: transaction-scoped advisory locks, taken in
    sorted order (no deadlock between writers of several resources).  SQLite: nothing to do — its write
    transactions run one at a time, across processes too (write lock file, gateway.store.db)."""
    for res_type, res_id in sorted(set(keys)):
        await xact_lock(conn, RESOURCE_LOCK_CLASS, f"{res_type}/{res_id}")


#: Class key of the conditional-operation locks (apart from the per-resource ones).
CONDITION_LOCK_CLASS = 0x46484943


async def lock_conditions(conn: AsyncConnection, conditions: Iterable[tuple[str, str]]) -> None:
    """Serialise conditional creates/updates/deletes with the same criteria until the transaction ends,
    across server processes, so two ``If-None-Exist: identifier=x`` creates racing each other give one
    resource, not two (the second waits, then its search sees the first one's commit: PostgreSQL READ
    COMMITTED reads what was committed before each statement).  ``conditions``: (type, query string);
    the criteria are normalised (parameter order does not matter) and the locks taken in sorted order (no
    deadlock between two transaction bundles).  Take them before :func:`lock_resources`.  SQLite: nothing
    to do, as for :func:`lock_resources`."""
    keys = {f"{t}?" + "&".join(f"{k}={v}" for k, v in sorted(parse_qsl(q.lstrip("?"), keep_blank_values=True)))
            for t, q in conditions}
    for key in sorted(keys):
        await xact_lock(conn, CONDITION_LOCK_CLASS, key)


async def _delete_derived(conn: AsyncConnection, idx_del: dict[str, list[int]], cm_del: dict[str, list[str]]) -> None:
    """Delete resources' search-index rows (``idx_del``: kind → rids) and FHIR-derived common-model rows
    (``cm_del``: table → "Type/id" sources; Observation component rows go with their panel)."""
    for kind, rids in idx_del.items():
        table = s.INDEX_TABLES[kind]
        await conn.execute(built_once(("fhir idx delete", kind), lambda: delete(table).where(
            table.c.rid.in_(bindparam("b_rids", expanding=True)))), {"b_rids": rids})
    for name, srcs in cm_del.items():
        table = CM_BY_NAME[name]
        await conn.execute(built_once(("fhir cm delete", name), lambda: delete(table).where(
            table.c.src_type == "fhir", table.c.src_id.in_(bindparam("b_srcs", expanding=True)))), {"b_srcs": srcs})
        if name == "cm_observation":  # component rows point at their panel
            await conn.execute(delete(table).where(table.c.parent_id.in_(srcs)))


async def apply_writes(conn: AsyncConnection, writes: Sequence[Write]) -> list[Stored]:
    """Persist every write (resource, history, index, common model) on ``conn``; returns new rows."""
    if not writes:
        return []
    last_updated, lu_ts = now_instant()
    results: list[Stored] = []
    new_rows: list[dict] = []
    updates: list[dict] = []
    history: list[dict] = []
    link_rows: list[dict] = []
    multi_links: dict[tuple[str, str], frozenset[str]] = {}
    superseded: list[dict] = []  # derived versions replaced by a newer derived version
    # patient links of every new version: computed once, here, stored per version
    # (a writer that names the patients — DICOM's ImagingStudy — is trusted with them: its identifier-only
    # subject is the DICOM PatientID, which no FHIR Patient identifier need carry)
    live = [w for w in writes if w.resource is not None and not w.links]
    all_links = dict(zip((id(w) for w in live), await links_of(
        conn, [dict(w.resource, id=w.res_id) for w in live], [dict(w.resource, id=w.res_id) for w in live])))
    all_links.update((id(w), patient_links(w.resource).ids) for w in writes if w.resource is not None and w.links)
    for w in writes:
        version = (w.prev.version + 1) if w.prev else 1
        content = None
        patient = None
        links: frozenset[str] = frozenset()
        if w.resource is not None:
            res = dict(w.resource)
            res["id"] = w.res_id
            meta = dict(res.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = last_updated
            res["meta"] = meta
            w.resource = res
            content = orjson.dumps(res).decode()
            links = all_links[id(w)] | w.links
            patient = primary_patient(links, compartment_patient(res))
            link_rows.extend({"res_type": w.res_type, "res_id": w.res_id, "version": version, "patient_id": p}
                             for p in sorted(links))
        multi = bool(links - {patient})
        row = {
            "res_type": w.res_type, "res_id": w.res_id, "version": version, "last_updated": last_updated,
            "lu_ts": lu_ts, "deleted": w.resource is None, "patient_id": patient, "content": content,
            "multi_link": multi,
        }
        history.append({k: row[k] for k in ("res_type", "res_id", "version", "last_updated", "lu_ts", "patient_id", "content")}
                       | {"method": DERIVED if w.derived else w.method})
        if w.derived and w.prev is not None:
            superseded.append({"b_type": w.res_type, "b_id": w.res_id, "b_version": w.prev.version})
        if w.prev is None:
            new_rows.append(row)
        else:
            updates.append(row | {"b_rid": w.prev.rid, "b_version": w.prev.version})
        results.append(Stored(w.prev.rid if w.prev else None, w.res_type, w.res_id, version, last_updated,
                              w.resource is None, patient, content, multi))
        if multi:
            multi_links[(w.res_type, w.res_id)] = links

    if updates:
        stmt = built_once(("fhir update current",), lambda: (
            update(R)
            .where(R.c.rid == bindparam("b_rid"), R.c.version == bindparam("b_version"))
            .values({k: bindparam(k) for k in ("version", "last_updated", "lu_ts", "deleted", "patient_id", "content",
                                               "multi_link")})
        ))
        res = await conn.execute(stmt, [{k: u[k] for k in ("b_rid", "b_version", "version", "last_updated", "lu_ts", "deleted",
                                                           "patient_id", "content", "multi_link")} for u in updates])
        if res.rowcount is not None and res.rowcount >= 0 and res.rowcount != len(updates):
            raise VersionConflict("a resource was changed concurrently")
    rid_by_key: dict[tuple[str, str], int] = {(w.res_type, w.res_id): w.prev.rid for w in writes if w.prev is not None}
    if new_rows:
        # RETURNING in any order (each row names its key): with sort_by_parameter_order SQLAlchemy ran one
        # INSERT per resource on SQLite (it cannot order a multi-row RETURNING there), 500 statements and
        # thread hand-overs per 500-resource transaction; without it, multi-row INSERTs on both engines
        ret = await conn.execute(
            built_once(("fhir insert current",), lambda: R.insert().returning(R.c.rid, R.c.res_type, R.c.res_id)),
            new_rows,
        )
        for r in ret:
            rid_by_key[(r.res_type, r.res_id)] = r.rid
    if superseded:
        await _drop_superseded(conn, superseded)
    await insert_rows(conn, H, history)
    await insert_rows(conn, s.fhir_link, link_rows)

    # Search index and common-model rows: only the difference to the previous version is written.
    # A table whose rows for the resource are unchanged is not touched; one that only gains rows gets
    # just those (an ImagingStudy gaining a series gains its series/instance tokens); otherwise the
    # resource's rows in that table are replaced.  (Before, every update deleted from every index and
    # common-model table: 14 statements for an ImagingStudy that changed one count.)
    idx_del: dict[str, list[int]] = {}
    cm_del: dict[str, list[str]] = {}
    idx_rows: dict[str, list[dict]] = {}
    cm_rows: dict[str, list[dict]] = {}
    for w, r in zip(writes, results):
        old = _derived_of(w.prev.content) if w.prev is not None and w.prev.content else ({}, {})
        new = _derived_of(r.content, w.resource) if w.resource is not None else ({}, {})
        rid = rid_by_key[(w.res_type, w.res_id)]
        base = {"rid": rid, "res_type": w.res_type}
        # index rows carry the resource's consent_no: a resource that changes patient gets all of them anew
        moved = w.prev is not None and w.resource is not None and (
            w.prev.patient_id != r.patient_id or w.prev.multi or r.multi)
        for kind in old[0].keys() | new[0].keys():
            drop, add = _row_diff(old[0].get(kind, []), new[0].get(kind, []))
            if moved and old[0].get(kind):
                drop, add = True, list(new[0].get(kind, []))
            if drop:
                idx_del.setdefault(kind, []).append(rid)
            idx_rows.setdefault(kind, []).extend(base | dict(zip(_IDX_COLS[kind], r)) for r in add)
        src = f"{w.res_type}/{w.res_id}"
        for table in old[1].keys() | new[1].keys():
            drop, add = _row_diff(old[1].get(table, []), new[1].get(table, []))
            if drop:
                cm_del.setdefault(table, []).append(src)
            cm_rows.setdefault(table, []).extend(dict(r) for r in add)
    await _delete_derived(conn, idx_del, cm_del)
    for table, rows_ in cm_rows.items():
        await insert_rows(conn, CM_BY_NAME[table], fit_rows(CM_BY_NAME[table], rows_))
    # Consent gate: a written Patient or Consent changes the patient's effective consent
    # profile; recompute it in this transaction so the very next request sees it.
    touched = {r.patient_id for r in results if r.res_type in ("Patient", "Consent")}
    touched |= {w.prev.patient_id for w in writes if w.res_type == "Consent" and w.prev is not None}
    touched.discard(None)
    from gateway.store.consent_schema import recompute, stamp_resources

    if touched:
        # also restamps every resource of those patients (and the index rows of those written before: the
        # new ones get theirs below)
        await recompute(conn, touched, unindexed={rid_by_key[(w.res_type, w.res_id)] for w in writes if w.prev is None})
    # an update that keeps the row's patient keeps its stamp (recompute restamps every row of a patient)
    same = {(w.res_type, w.res_id) for w, r in zip(writes, results) if w.prev is not None and not w.prev.deleted
            and w.resource is not None and w.prev.patient_id == r.patient_id and not w.prev.multi and not r.multi}
    await stamp_resources(conn, [(rid_by_key[(r.res_type, r.res_id)], r.patient_id) for r in results
                                 if r.patient_id not in touched and (r.res_type, r.res_id) not in same
                                 and not r.multi])
    # several patients: the stamp of all of them together (their index rows follow below)
    from gateway.store.consent_schema import stamp_linked

    await stamp_linked(conn, {rid_by_key[k]: v for k, v in multi_links.items()})
    # Search-index rows carry their resource's consent_no (just stamped, under the patients' locks), so the
    # gate can be part of the index lookup that drives a search.
    if any(idx_rows.values()):
        written = sorted({row["rid"] for rows_ in idx_rows.values() for row in rows_})
        nos: dict[int, int | None] = {}
        for i in range(0, len(written), 500):
            rows_ = await conn.execute(built_once(("fhir consent_no",), lambda: select(R.c.rid, R.c.consent_no).where(
                R.c.rid.in_(bindparam("b_rids", expanding=True)))), {"b_rids": written[i:i + 500]})
            nos.update((rid, no) for rid, no in rows_)
        for kind, rows_ in idx_rows.items():
            if rows_:
                for row in rows_:
                    row["consent_no"] = nos[row["rid"]]
                await insert_rows(conn, s.INDEX_TABLES[kind], fit_rows(s.INDEX_TABLES[kind], rows_))
    return [
        Stored(rid_by_key.get((r.res_type, r.res_id)), r.res_type, r.res_id, r.version, r.last_updated, r.deleted,
               r.patient_id, r.content, r.multi)
        for r in results
    ]


async def reindex(conn: AsyncConnection, after_rid: int, limit: int) -> tuple[int, int]:
    """Rebuild the search-index and common-model rows of up to ``limit`` current resources with rid >
    ``after_rid`` from their stored content, on ``conn`` (a write transaction); returns (how many were
    rebuilt, the last rid; 0 when none is left).  :func:`apply_writes` writes only the rows that differ
    from the previous version's *derived* rows, so after a change to the search parameters or the
    common-model mapping the stored rows must be rebuilt once (``fedgate reindex``).  Rows from DICOM
    (``dcm_*``, ``src_type = 'dicom'``) and OMOP imports are not touched."""
    keys = (await conn.execute(select(R.c.rid, R.c.res_type, R.c.res_id)
                               .where(R.c.rid > after_rid, R.c.deleted.is_(False))
                               .order_by(R.c.rid).limit(limit))).all()
    if not keys:
        return 0, 0
    # PostgreSQL: no FHIR write of these resources in between (SQLite: the write transaction is alone);
    # their content is read once locked
    await lock_resources(conn, [(r.res_type, r.res_id) for r in keys])
    rows = (await conn.execute(select(R.c.rid, R.c.res_type, R.c.res_id, R.c.content, R.c.consent_no, R.c.patient_id)
                               .where(R.c.rid.in_([r.rid for r in keys]), R.c.deleted.is_(False))
                               .order_by(R.c.rid))).all()
    rids = [r.rid for r in rows]
    srcs = [f"{r.res_type}/{r.res_id}" for r in rows]
    await _delete_derived(conn, {kind: rids for kind in s.INDEX_TABLES}, {name: srcs for name in CM_BY_NAME})
    idx_rows: dict[str, list[dict]] = {}
    cm_rows: dict[str, list[dict]] = {}
    for r in rows:
        idx, cm = _derived(orjson.loads(r.content))
        base = {"rid": r.rid, "res_type": r.res_type, "consent_no": r.consent_no}
        for kind, values in idx.items():
            idx_rows.setdefault(kind, []).extend(base | dict(zip(_IDX_COLS[kind], v)) for v in values)
        for table, values in cm.items():
            cm_rows.setdefault(table, []).extend(dict(v) for v in values)
    for kind, values in idx_rows.items():
        await conn.execute(table_insert(s.INDEX_TABLES[kind]), fit_rows(s.INDEX_TABLES[kind], values))
    for table, values in cm_rows.items():
        await conn.execute(table_insert(CM_BY_NAME[table]), fit_rows(CM_BY_NAME[table], values))
    # the patients' effective consent (cm_patient.consent_profile, the stamps) as apply_writes leaves it
    touched = {r.patient_id for r in rows if r.res_type in ("Patient", "Consent")} - {None}
    if touched:
        from gateway.store.consent_schema import recompute

        await recompute(conn, touched)
    return len(rows), keys[-1].rid


#: ``fhir_history.method`` of a derived version (:attr:`Write.derived`); rendered as the HTTP method that
#: made it (POST for version 1, PUT after), like any other version
DERIVED = "DERIVED"


async def _drop_superseded(conn: AsyncConnection, superseded: list[dict]) -> None:
    """Remove the previous versions that a derived write replaces, where they were derived themselves
    (a version a FHIR client wrote stays), with their patient links."""
    key = (H.c.res_type == bindparam("b_type"), H.c.res_id == bindparam("b_id"), H.c.version == bindparam("b_version"))
    gone = await conn.execute(built_once(("fhir drop superseded",), lambda: H.delete().where(
        *key, H.c.method == DERIVED)), superseded)
    if gone.rowcount:
        lk = s.fhir_link.c
        await conn.execute(built_once(("fhir drop superseded links",), lambda: s.fhir_link.delete().where(
            lk.res_type == bindparam("b_type"), lk.res_id == bindparam("b_id"), lk.version == bindparam("b_version"),
            ~exists().where(H.c.res_type == lk.res_type, H.c.res_id == lk.res_id, H.c.version == lk.version))),
            superseded)


async def _relinks(conn: AsyncConnection, rows, resources: list[dict]) -> list[frozenset[str]]:
    """Links of stored versions as :func:`apply_writes` computes them: an ImagingStudy of a study in the
    DICOM index is linked to that study's patient (as the DICOM writer declares it)."""
    from gateway.store.dicom_schema import dcm_study

    uids = sorted({r.res_id for r in rows if r.res_type == "ImagingStudy"})
    dicom: dict[str, str] = {}
    for i in range(0, len(uids), 500):
        dicom.update((await conn.execute(select(dcm_study.c.study_uid, dcm_study.c.patient_id).where(
            dcm_study.c.study_uid.in_(uids[i:i + 500]), dcm_study.c.patient_id.is_not(None)))).all())
    plain = [(n, res) for n, (r, res) in enumerate(zip(rows, resources))
             if not (r.res_type == "ImagingStudy" and r.res_id in dicom)]
    out: list[frozenset[str]] = [frozenset()] * len(rows)
    for (n, _), lk in zip(plain, await links_of(conn, [res for _, res in plain])):
        out[n] = lk
    for n, (r, res) in enumerate(zip(rows, resources)):
        if r.res_type == "ImagingStudy" and r.res_id in dicom:
            out[n] = patient_links(res).ids | {dicom[r.res_id]}
    return out


async def relink(conn: AsyncConnection, *, history: bool = True) -> int:
    """Recompute the patient links of every stored version (``history``) and of every current
    resource — ``patient_id``, ``multi_link``, ``fhir_link`` — and restamp ``consent_no`` from them: the
    back-fill of stores written before links existed (run once by ``consent_schema.ensure_indexes``) and
    part of ``fedgate reindex``.  Returns the number of current resources relinked."""
    from gateway.store.consent_schema import _stamp_all, _stamp_index, index_tables, stamp_linked

    L = s.fhir_link
    if history:
        await conn.execute(delete(L))
        last = ("", "", 0)
        while True:
            rows = (await conn.execute(
                select(H.c.res_type, H.c.res_id, H.c.version, H.c.content)
                .where(H.c.content.is_not(None), tuple_(H.c.res_type, H.c.res_id, H.c.version) > tuple_(*last))
                .order_by(H.c.res_type, H.c.res_id, H.c.version).limit(500))).all()
            if not rows:
                break
            last = (rows[-1].res_type, rows[-1].res_id, rows[-1].version)
            resources = [orjson.loads(r.content) for r in rows]
            links = await _relinks(conn, rows, resources)
            out = [{"res_type": r.res_type, "res_id": r.res_id, "version": r.version, "patient_id": p}
                   for r, lk in zip(rows, links) for p in sorted(lk)]
            if out:
                await conn.execute(table_insert(L), out)
    n = 0
    after = 0
    multi: dict[int, frozenset[str]] = {}
    while True:
        rows = (await conn.execute(select(R.c.rid, R.c.res_type, R.c.res_id, R.c.version, R.c.content)
                                   .where(R.c.rid > after, R.c.deleted.is_(False))
                                   .order_by(R.c.rid).limit(500))).all()
        if not rows:
            break
        after = rows[-1].rid
        resources = [orjson.loads(r.content) for r in rows]
        links = await _relinks(conn, rows, resources)
        for r, res, lk in zip(rows, resources, links):
            pid = primary_patient(lk, compartment_patient(res))
            is_multi = bool(lk - {pid})
            await conn.execute(update(R).where(R.c.rid == r.rid).values(patient_id=pid, multi_link=is_multi))
            if is_multi:
                multi[r.rid] = lk
            if not history:
                await conn.execute(delete(L).where(L.c.res_type == r.res_type, L.c.res_id == r.res_id,
                                                   L.c.version == r.version))
                if lk:
                    await conn.execute(table_insert(L), [{"res_type": r.res_type, "res_id": r.res_id,
                                                          "version": r.version, "patient_id": p} for p in sorted(lk)])
            n += 1
    await _stamp_all(conn, R)
    for table in index_tables():
        await _stamp_index(conn, table)
    await stamp_linked(conn, multi)
    return n
