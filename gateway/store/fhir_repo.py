"""FHIR resource persistence: versions, history, the search index and the common-model projection.

All writes of one interaction (or one whole transaction Bundle) go through :func:`apply_writes` on a
connection from :meth:`Database.write`, so they commit or roll back together.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import and_, bindparam, delete, func, not_, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store import schema as s
from gateway.store.db import built_once, fit_rows, table_insert, xact_lock
from gateway.store.cm_rows import CM_BY_NAME, row_for
from gateway.store.scope import AccessScope
from mappings.dates import now_instant
from mappings.fhir.index import compartment_patient, extract
from mappings.fhir.links import patient_links, primary_patient
from mappings.fhir.project import project
from mappings.fhir.search import ANY, Clause, SearchQuery

R = s.fhir_resource
H = s.fhir_history


@dataclass(frozen=True, slots=True)
class Stored:
    rid: int | None
    res_type: str
    res_id: str
    version: int
    last_updated: str
    deleted: bool
    patient_id: str | None
    content: str | None  # JSON text (None when deleted)
    #: consent_no comes from several patient links (fhir_resource.multi_link)
    multi: bool = False

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    def resource(self) -> dict[str, Any]:
        return orjson.loads(self.content) if self.content else {}


@dataclass(slots=True)
class Write:
    """One pending change: ``resource`` is None for a delete; ``prev`` is the current row, if any."""

    res_type: str
    res_id: str
    resource: dict[str, Any] | None
    prev: Stored | None
    method: str  # POST | PUT | DELETE
    #: patients the writer knows the resource belongs to besides its references (the DICOM patient of an
    #: ImagingStudy built from DICOM)
    links: frozenset[str] = frozenset()


_COLS = (R.c.rid, R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated, R.c.deleted, R.c.patient_id, R.c.content,
         R.c.multi_link)


def _stored(row) -> Stored:
    return Stored(row.rid, row.res_type, row.res_id, row.version, row.last_updated, bool(row.deleted),
                  row.patient_id, row.content, bool(row.multi_link))


async def resolve_identifiers(conn: AsyncConnection, idents: Iterable[str],
                              pending: Iterable[dict[str, Any]] = ()) -> dict[str, str]:
    """"system|value" → id of the (non-deleted) Patient carrying that identifier, through the search
    index and the Patients being written (``pending``); an identifier carried by several Patients
    resolves to none of them (the link then becomes ``UNKNOWN``: fail closed)."""
    idents = set(idents)
    if not idents:
        return {}
    hits: dict[str, set[str]] = {}
    for res in pending:
        if res.get("resourceType") == "Patient":
            for i in res.get("identifier") or ():
                if isinstance(i, dict) and i.get("value"):
                    key = f"{i.get('system') or ''}|{i['value']}"
                    if key in idents:
                        hits.setdefault(key, set()).add(res.get("id"))
    codes = sorted({i.partition("|")[2] for i in idents})
    t = s.idx_token
    stmt = built_once(("resolve patient identifiers",), lambda: select(R.c.res_id, t.c.system, t.c.code).join(
        t, t.c.rid == R.c.rid).where(t.c.res_type == "Patient", t.c.param == "identifier",
                                     t.c.code.in_(bindparam("b_codes", expanding=True)), R.c.deleted.is_(False)))
    for i in range(0, len(codes), 500):
        for rid_, system, code in await conn.execute(stmt, {"b_codes": codes[i:i + 500]}):
            key = f"{system or ''}|{code}"
            if key in idents:
                hits.setdefault(key, set()).add(rid_)
    return {k: next(iter(v)) for k, v in hits.items() if len(v) == 1}


async def links_of(conn: AsyncConnection, resources: Sequence[dict[str, Any]],
                   pending: Iterable[dict[str, Any]] = ()) -> list[frozenset[str]]:
    """The patient links of each resource (``mappings.fhir.links``), identifiers resolved."""
    raw = [patient_links(r) for r in resources]
    found = await resolve_identifiers(conn, {i for lk in raw for g in lk.identifiers for i in g}, pending)
    return [lk.resolve(found) for lk in raw]


async def get_current(conn: AsyncConnection, res_type: str, res_id: str) -> Stored | None:
    row = (await conn.execute(select(*_COLS).where(R.c.res_type == res_type, R.c.res_id == res_id))).first()
    return _stored(row) if row else None


async def get_current_many(conn: AsyncConnection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
    """Current rows (deleted ones included) for (type, id) keys, in one statement; absent keys are missing."""
    keys = list(keys)
    if not keys:
        return {}
    if len(keys) > 16:  # rare (transaction bundles): built for this call
        stmt = select(*_COLS).where(or_(*[and_(R.c.res_type == t, R.c.res_id == i) for t, i in keys]))
        rows = await conn.execute(stmt)
    else:
        stmt = built_once(("fhir current", len(keys)), lambda: select(*_COLS).where(or_(*[
            and_(R.c.res_type == bindparam(f"t{n}"), R.c.res_id == bindparam(f"i{n}")) for n in range(len(keys))])))
        rows = await conn.execute(stmt, {k: v for n, (t, i) in enumerate(keys) for k, v in ((f"t{n}", t), (f"i{n}", i))})
    return {(r.res_type, r.res_id): _stored(r) for r in rows}


async def get_many(conn: AsyncConnection, keys: Iterable[tuple[str, str]], scope: AccessScope) -> list[Stored]:
    """Current, non-deleted resources for (type, id) keys that the scope lets the caller see."""
    by_type: dict[str, set[str]] = {}
    for t, i in keys:
        by_type.setdefault(t, set()).add(i)
    out: list[Stored] = []
    for t, ids in by_type.items():
        rows = await conn.execute(
            select(*_COLS).where(
                R.c.res_type == t, R.c.res_id.in_(sorted(ids)), R.c.deleted.is_(False),
                scope.row_clause(R.c.consent_no),
            )
        )
        out.extend(_stored(r) for r in rows)
    return out


async def referenced(conn: AsyncConnection, sources: Sequence[Stored], scope: AccessScope,
                     skip_types: Iterable[str]) -> list[Stored]:
    """The resources that ``sources`` reference through their reference search parameters, other than types in
    ``skip_types`` and the sources themselves, as far as ``scope`` lets the caller see them."""
    ref, skip = s.idx_ref, set(skip_types)
    seen = {(x.res_type, x.res_id) for x in sources}
    keys: set[tuple[str, str]] = set()
    rids = [x.rid for x in sources]
    for n in range(0, len(rids), 500):
        stmt = select(ref.c.target_type, ref.c.target_id).where(ref.c.rid.in_(rids[n:n + 500])).distinct()
        keys.update((r.target_type, r.target_id) for r in await conn.execute(stmt)
                    if r.target_type and r.target_type not in skip and (r.target_type, r.target_id) not in seen)
    return await get_many(conn, sorted(keys), scope) if keys else []


async def get_visible(conn: AsyncConnection, scope: AccessScope, res_type: str, res_id: str) -> Stored | None:
    """The current row (deleted or not) if ``scope`` may see it (``gateway.store.access.where``)."""
    from gateway.store.access import where

    row = (await conn.execute(select(*_COLS).where(R.c.res_type == res_type, R.c.res_id == res_id,
                                                   where(scope, R)))).first()
    return _stored(row) if row else None


async def get_version(conn: AsyncConnection, res_type: str, res_id: str, version: int,
                      scope: AccessScope | None = None) -> Stored | None:
    """One stored version; with ``scope``, only if it may see it (the history rule: the version's own
    links and the resource's current state, ``gateway.store.access``)."""
    from gateway.store.access import where

    cond = [H.c.res_type == res_type, H.c.res_id == res_id, H.c.version == version]
    if scope is not None:
        cond.append(where(scope, H))
    row = (await conn.execute(select(H).where(*cond))).first()
    if row is None:
        return None
    return Stored(None, row.res_type, row.res_id, row.version, row.last_updated, row.method == "DELETE",
                  row.patient_id, row.content)


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
                       | {"method": w.method})
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
        ret = await conn.execute(
            built_once(("fhir insert current",), lambda: R.insert().returning(R.c.rid, R.c.res_type, R.c.res_id,
                                                                     sort_by_parameter_order=True)), new_rows
        )
        for r in ret:
            rid_by_key[(r.res_type, r.res_id)] = r.rid
    await conn.execute(table_insert(H), history)
    if link_rows:
        await conn.execute(table_insert(s.fhir_link), link_rows)

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
        if rows_:
            await conn.execute(table_insert(CM_BY_NAME[table]), fit_rows(CM_BY_NAME[table], rows_))
    # Consent gate: a written Patient or Consent changes the patient's effective consent
    # profile; recompute it in this transaction so the very next request sees it.
    touched = {r.patient_id for r in results if r.res_type in ("Patient", "Consent")}
    touched |= {w.prev.patient_id for w in writes if w.res_type == "Consent" and w.prev is not None}
    touched.discard(None)
    from gateway.store.consent_schema import recompute, stamp_resources

    if touched:
        await recompute(conn, touched)  # also restamps every resource of those patients
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
                await conn.execute(table_insert(s.INDEX_TABLES[kind]), fit_rows(s.INDEX_TABLES[kind], rows_))
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


# ------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SearchResult:
    matches: list[Stored]
    total: int | None
    included: list[Stored] = field(default_factory=list)
    #: whether rows follow this page (None: not known; callers then go by ``total``)
    more: bool | None = None
    #: the keyset of the page's last match (its ``_sort`` key values, then its rid): where the next page starts
    last_key: tuple | None = None
    #: the opaque cursor of the next page (issued by the service when ``more``)
    next_cursor: str | None = None


def _date_pred(lo_col, hi_col, prefix: str, plo: float, phi: float):
    """FHIR R4 §3.1.1.4.1.3 date comparison of the stored range [lo, hi] with the parameter's [plo, phi].
    ``eq``, ``ge`` and ``le`` also get the bound they imply on one column (``lo ≤ phi``, ``hi ≥ plo``),
    so an index on (type, param, lo) or (type, param, hi) is a range seek instead of a scan of the
    parameter's every row."""
    contained = and_(lo_col >= plo, hi_col <= phi)
    if prefix == "eq":
        return and_(lo_col <= phi, contained)
    if prefix == "ne":
        return or_(lo_col < plo, hi_col > phi)
    if prefix == "gt":
        return hi_col > phi
    if prefix == "lt":
        return lo_col < plo
    if prefix == "ge":
        return and_(hi_col >= plo, or_(hi_col > phi, contained))
    if prefix == "le":
        return and_(lo_col <= phi, or_(lo_col < plo, contained))
    if prefix == "sa":
        return lo_col > phi
    if prefix == "eb":
        return hi_col < plo
    # ap: overlap within 10% of the distance to now (at least a day)
    from time import time as _now

    slack = max(86400.0, abs(_now() - plo) * 0.1)
    return and_(lo_col <= phi + slack, hi_col >= plo - slack)


def _value_pred(clause: Clause, table, value) -> Any:
    t = clause.param.type
    if t == "token":
        system, code = value
        preds = []
        if code is not None and clause.modifier in ("below", "above"):
            # subsumption through the vocabulary store's active closure (docs/vocab.md); the code itself too
            from gateway.store.vocab_schema import ancestors_select, descendants_select

            sys_ = system if isinstance(system, str) else None
            related = (descendants_select if clause.modifier == "below" else ancestors_select)(sys_, code)
            preds.append(or_(table.c.code == code, table.c.code.in_(related)))
        elif code is not None:
            preds.append(table.c.code == code)
        if system is None:
            preds.append(table.c.system.is_(None))
        elif system is not ANY:
            preds.append(table.c.system == system)
        return and_(*preds)
    if t == "string":
        from mappings.fhir.index import normalise

        if clause.modifier == "exact":
            return table.c.exact == value
        norm = normalise(value)
        if clause.modifier == "contains":
            esc = norm.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return table.c.norm.like(f"%{esc}%", escape="\\")
        return and_(table.c.norm >= norm, table.c.norm < norm + "\U0010ffff")
    if t == "date":
        prefix, plo, phi = value
        return _date_pred(table.c.lo, table.c.hi, prefix, plo, phi)
    if t == "reference":
        rtype, rid = value
        pred = table.c.target_id == rid
        return and_(pred, table.c.target_type == rtype) if rtype else pred
    if t == "quantity":
        prefix, v, vlo, vhi, system, code = value
        col = table.c.value
        num = {
            "eq": and_(col >= vlo, col < vhi), "ne": or_(col < vlo, col >= vhi), "gt": col > v, "lt": col < v,
            "ge": col >= v, "le": col <= v, "sa": col > v, "eb": col < v,
            "ap": and_(col >= v - abs(v) * 0.1, col <= v + abs(v) * 0.1),
        }[prefix]
        preds = [num]
        if system:
            preds.append(table.c.system == system)
        if code:
            preds.append(table.c.code == code)
        return and_(*preds)
    raise ValueError(t)  # pragma: no cover


#: How selective a clause usually is (lower = fewer matches): the most selective one drives the query.
_SELECTIVITY = {"reference": 0, "token": 1, "string": 2, "quantity": 3, "date": 4}


def _selectivity(clause: Clause) -> int:
    if clause.param.name == "_id":
        return -1
    if clause.missing is not None or clause.modifier == "not" or clause.param.name == "_lastUpdated":
        return 9
    return _SELECTIVITY.get(clause.param.type, 5)


def clause_sql(clause: Clause, res_type: str, *, driving: bool = True, scope: AccessScope | None = None,
               after_rid: int | None = None):
    """SQL predicate over ``fhir_resource`` for one search clause.

    The driving clause (the most selective) becomes ``rid IN (index lookup)``; the others are correlated
    ``EXISTS`` probes on the index's ``rid`` column, so no large intermediate rid set is materialised
    (a common code across 100k resources would otherwise be built in full for every query).  With
    ``scope``, the driving lookup also applies the consent gate to the index rows' ``consent_no`` (tested
    inside the partial gate index, ``schema.GATE_INDEXES``, instead of on every candidate resource row);
    the caller passes it only when :func:`_drives` says the clause becomes such a lookup.  ``after_rid``
    (keyset paging in rid order): the lookup starts after that rid, a range seek on the index's rid column.
    """
    name = clause.param.name
    if name == "_id":
        ids = [v[1] for v in clause.values]
        pred = R.c.res_id.in_(ids)
        return not_(pred) if clause.modifier == "not" else pred
    if name == "_lastUpdated":
        return or_(*[_date_pred(R.c.lu_ts, R.c.lu_ts, p, lo, hi) for p, lo, hi in clause.values])
    table = s.INDEX_TABLES[clause.param.type]
    preds = [table.c.res_type == res_type, table.c.param == name]
    if clause.missing is None:
        preds.append(or_(*[_value_pred(clause, table, v) for v in clause.values]))
    negate = clause.missing is True or (clause.missing is None and clause.modifier == "not")
    if driving and not negate:
        if scope is not None:
            preds.append(scope.row_clause(table.c.consent_no))
        if after_rid is not None:
            preds.append(table.c.rid > after_rid)
        return R.c.rid.in_(select(table.c.rid).where(*preds))
    probe = select(table.c.rid).where(table.c.rid == R.c.rid, *preds).exists()
    return not_(probe) if negate else probe


def _sort_col(res_type: str, pname: str, desc: bool):
    """The value a ``_sort`` parameter orders by (nullable for index parameters) and whether it can be NULL."""
    if pname == "_lastUpdated":
        return R.c.lu_ts, False
    if pname == "_id":
        return R.c.res_id, False
    from mappings.fhir.searchparams import params_for

    sp = params_for(res_type)[pname]
    table = s.INDEX_TABLES[sp.type]
    # (the parser lets only these types through: mappings.fhir.search.SORTABLE_TYPES)
    value_col = {"date": "hi" if desc else "lo", "string": "norm", "token": "code", "quantity": "value",
                 "reference": "target_id"}[sp.type]
    value_col = table.c[value_col]
    agg = func.max(value_col) if desc else func.min(value_col)
    return select(agg).where(table.c.rid == R.c.rid, table.c.param == pname).scalar_subquery(), True


def keyset_after(keys: Sequence[tuple[Any, bool, bool]], after: Sequence[Any]):
    """Predicate: the row comes after the keyset ``after`` in the order of ``keys`` — (column, descending,
    nullable) each, NULLs last in either direction, the last key unique (``rid``): the WHERE clause of
    keyset ("seek") paging, which reads only the rows of the page instead of skipping an OFFSET."""
    col, desc, nullable = keys[0]
    v = after[0]
    if len(keys) == 1:
        return (col < v) if desc else (col > v)
    rest = keyset_after(keys[1:], after[1:])
    if v is None:  # NULLs come last: only rows with NULL here too can follow, ordered by the rest
        return and_(col.is_(None), rest)
    beyond = (col < v) if desc else (col > v)
    if nullable:
        beyond = or_(beyond, col.is_(None))
    return or_(beyond, and_(col == v, rest))


def _drives(clause: Clause) -> bool:
    """Whether :func:`clause_sql` makes this clause, as the first one, an ``rid IN (index lookup)``."""
    return _selectivity(clause) not in (-1, 9)


def compartment_clause(patient_id: str | tuple[str, ...]):
    """Rows in Patient ``patient_id``'s compartment (or in any of several patients'): the current version is
    linked to that patient (``fhir_link``: every patient it references, computed when the version was
    written)."""
    L = s.fhir_link
    who = L.c.patient_id == patient_id if isinstance(patient_id, str) else L.c.patient_id.in_(sorted(patient_id))
    return select(L.c.patient_id).where(L.c.res_type == R.c.res_type, L.c.res_id == R.c.res_id,
                                        L.c.version == R.c.version, who).exists()


def compartment_terms(patient_id: str | tuple[str, ...], res_type: str) -> list:
    """:func:`compartment_clause` as the driving lookup of a compartment search: the ids of ``res_type``
    linked to the patient or patients (``fhir_link``'s (patient, type) index), each looked up by (type, id),
    and the link of the current version."""
    L = s.fhir_link
    who = L.c.patient_id == patient_id if isinstance(patient_id, str) else L.c.patient_id.in_(sorted(patient_id))
    ids = select(L.c.res_id).where(who, L.c.res_type == res_type)
    return [R.c.res_id.in_(ids), compartment_clause(patient_id)]


def _search_where(q: SearchQuery, scope: AccessScope, after_rid: int | None = None) -> list:
    """The WHERE terms of search ``q`` in ``scope`` (``after_rid``: pushed into the driving index lookup).

    What drives the query: the compartment when there is one (one patient's resources, through
    ``fhir_link``'s patient index), else the most selective clause's index lookup when it has one
    (:func:`_drives`), else the resource table by type."""
    ordered = sorted(q.clauses, key=_selectivity)
    lookup = q.compartment is None and bool(ordered) and _drives(ordered[0])
    where = [R.c.deleted.is_(False)]
    if lookup and not scope.unrestricted:
        # the consent gate inside the driving index lookup (its rows carry the resource's consent_no): only
        # permitted candidates are fetched at all, instead of a consent test on every candidate resource
        where += [clause_sql(ordered[0], q.res_type, driving=True, scope=scope, after_rid=after_rid)]
    elif lookup:
        where.insert(0, scope.row_clause(R.c.consent_no))
        where += [clause_sql(ordered[0], q.res_type, driving=True, after_rid=after_rid)]
    else:
        # consent first: a row it rejects skips the rest (SQLite evaluates terms in order)
        where.insert(0, scope.row_clause(R.c.consent_no))
        where += [clause_sql(ordered[0], q.res_type, driving=q.compartment is None)] if ordered else []
    where += [clause_sql(c, q.res_type, driving=False) for c in ordered[1:]]
    if q.compartment is not None:
        where += compartment_terms(q.compartment, q.res_type)
    if not lookup:
        # no index lookup drives the query: restrict by type here.  (When one does, its rows already carry
        # the type, and a res_type predicate would tempt SQLite into scanning every resource of the type.)
        where.insert(0, R.c.res_type == q.res_type)
    return where


def count_statement(q: SearchQuery, scope: AccessScope, where: list | None = None):
    """``SELECT count(*)`` of the matches of ``q`` in ``scope`` (``_total=accurate``, ``_summary=count``)."""
    return select(func.count()).select_from(R).where(*(where if where is not None else _search_where(q, scope)))


def _streamed(q: SearchQuery) -> Clause | None:
    """The clause that drives ``q`` as a streamed index walk, if it can: in the default (rid) order, an
    equality lookup of one value — a token code, a reference — reads the index in rid order already
    ((type, param, value, rid) index), so the page is a join that stops after ``_count`` + 1 rows instead
    of an ``rid IN (every match)`` set built on every page (a common code has 10 % of a store's rows)."""
    if q.sort or q.compartment is not None or (q.offset and q.after is None):  # (_offset: the IN form)
        return None
    ordered = sorted(q.clauses, key=_selectivity)
    if not ordered or not _drives(ordered[0]):
        return None
    c = ordered[0]
    if len(c.values) != 1 or clause_has_modifier(c):
        return None
    if c.param.type == "token" and c.values[0][1] is not None:
        return c
    if c.param.type == "reference":
        return c
    return None


def clause_has_modifier(c: Clause) -> bool:
    return c.modifier is not None and not (c.param.type == "reference" and c.modifier[:1].isupper())


def _streamed_statement(q: SearchQuery, scope: AccessScope, c: Clause, after_rid: int | None, limit: int):
    # an alias: the other clauses' probes on the same index table must not correlate with the walked rows
    table = s.INDEX_TABLES[c.param.type].alias("walk")
    preds = [table.c.res_type == q.res_type, table.c.param == c.param.name, _value_pred(c, table, c.values[0])]
    if not scope.unrestricted:  # the gate inside the index walk (its rows carry the resource's consent_no)
        preds.append(scope.row_clause(table.c.consent_no))
    if after_rid is not None:
        preds.append(table.c.rid > after_rid)
    others = [clause_sql(x, q.res_type, driving=False) for x in sorted(q.clauses, key=_selectivity)[1:]]
    return (select(*_COLS).select_from(table.join(R, R.c.rid == table.c.rid))
            .where(*preds, R.c.deleted.is_(False), *others).order_by(table.c.rid).limit(limit))


def page_statement(q: SearchQuery, scope: AccessScope, where: list | None = None):
    """The SELECT of one page of ``q`` in ``scope`` (``q.count`` + 1 rows: the extra one says whether more
    follow) and the number of its keyset columns (``k0``, ``k1``, ... then ``rid``)."""
    after_rid = q.after[-1] if q.after is not None and not q.sort else None
    if (c := _streamed(q)) is not None:
        return _streamed_statement(q, scope, c, after_rid, q.count + 1), 1
    keys = [(col, d, nullable) for p, d in q.sort for col, nullable in [_sort_col(q.res_type, p, d)]]
    keys.append((R.c.rid, False, False))
    if after_rid is not None:
        page_where = _search_where(q, scope, after_rid)
    else:
        page_where = list(where if where is not None else _search_where(q, scope))
    if q.after is not None:  # (the service checked that the keyset fits the sort: gateway.services.search_cursor)
        page_where.append(keyset_after(keys, q.after))
    order = [(c.desc() if d else c.asc()).nulls_last() if n else (c.desc() if d else c.asc()) for c, d, n in keys]
    sort_vals = [c.label(f"k{n}") for n, (c, _, _) in enumerate(keys[:-1])]
    stmt = select(*_COLS, *sort_vals).where(*page_where).order_by(*order).limit(q.count + 1)
    if q.after is None and q.offset:
        stmt = stmt.offset(q.offset)
    return stmt, len(keys)


async def _distinct_rids(conn: AsyncConnection, q: SearchQuery, scope: AccessScope, c: Clause, rows: list) -> list:
    """A streamed page (:func:`_streamed`) without the repeats of a resource that has the value twice (two
    codings with the same code): they come together (rid order); when dropping them leaves the page short,
    the walk goes on after the last rid read."""
    want = q.count + 1
    out: list = []
    batch = rows
    while True:
        for r in batch:
            if not out or r.rid != out[-1].rid:
                out.append(r)
        if len(batch) < want or len(out) >= want:
            return out[:want]
        batch = (await conn.execute(_streamed_statement(q, scope, c, batch[-1].rid, want))).all()


async def search(conn: AsyncConnection, q: SearchQuery, scope: AccessScope) -> SearchResult:
    """One page of the search ``q`` in the caller's ``scope``: the page after ``q.after`` (keyset paging,
    the ``next`` links' cursors) or at ``q.offset`` (explicit ``_offset``), ordered by ``_sort`` then rid.

    ``total``: counted only for ``_total=accurate`` and ``_summary=count`` / ``_count=0``; for the default
    (``estimate``) it is given when the page reaches the end of the matches (``q.position`` + the page),
    which costs nothing; ``none`` never.  ``more`` is known from one row read beyond the page."""
    where = _search_where(q, scope)
    total = None
    if q.total == "accurate" or q.summary == "count" or q.count == 0:
        total = (await conn.execute(count_statement(q, scope, where))).scalar_one()
    if q.summary == "count" or q.count == 0:
        return SearchResult([], total, more=False)
    stmt, nkeys = page_statement(q, scope, where)
    rows = (await conn.execute(stmt)).all()
    if (c := _streamed(q)) is not None:
        rows = await _distinct_rids(conn, q, scope, c, rows)
    more = len(rows) > q.count
    rows = rows[:q.count]
    matches = [_stored(r) for r in rows]
    last_key = (*(getattr(rows[-1], f"k{n}") for n in range(nkeys - 1)), rows[-1].rid) if rows else None
    start = q.offset if q.after is None else q.position
    if total is None and not more and q.total == "estimate" and (matches or not start):
        total = start + len(matches)
    included = await _includes(conn, q, matches, scope) if matches and (q.includes or q.revincludes) else []
    return SearchResult(matches, total, included, more=more, last_key=last_key)


async def visible_types(conn: AsyncConnection, scope: AccessScope) -> list[str]:
    """The resource types of which ``scope`` sees at least one current resource (Bulk Data ``$export``
    without ``_type``), sorted."""
    from gateway.store.access import where

    rows = await conn.execute(select(R.c.res_type).where(R.c.deleted.is_(False), where(scope, R)).distinct())
    return sorted(r.res_type for r in rows)


async def _includes(conn: AsyncConnection, q: SearchQuery, matches: list[Stored], scope: AccessScope) -> list[Stored]:
    seen = {(m.res_type, m.res_id) for m in matches}
    keys: list[tuple[str, str]] = []
    rids = [m.rid for m in matches]
    ref = s.idx_ref
    for inc in q.includes:
        stmt = select(ref.c.target_type, ref.c.target_id).where(
            ref.c.rid.in_(rids), ref.c.res_type == inc.source_type, ref.c.param == inc.param,
        )
        if inc.target_type:
            stmt = stmt.where(ref.c.target_type == inc.target_type)
        keys += [(r.target_type, r.target_id) for r in await conn.execute(stmt) if r.target_type]
    out = [x for x in await get_many(conn, [k for k in keys if k not in seen], scope)]
    seen.update((x.res_type, x.res_id) for x in out)
    ids = sorted({m.res_id for m in matches})
    for inc in q.revincludes:
        stmt = (
            select(*_COLS)
            .join(ref, ref.c.rid == R.c.rid)
            .where(
                ref.c.res_type == inc.source_type, ref.c.param == inc.param, ref.c.target_id.in_(ids),
                or_(ref.c.target_type == q.res_type, ref.c.target_type.is_(None)),
                R.c.deleted.is_(False), scope.row_clause(R.c.consent_no),
            )
        )
        for r in await conn.execute(stmt):
            st = _stored(r)
            if (st.res_type, st.res_id) not in seen:
                seen.add((st.res_type, st.res_id))
                out.append(st)
    return out


async def history(
    conn: AsyncConnection,
    scope: AccessScope,
    *,
    res_type: str | None = None,
    res_id: str | None = None,
    since: float | None = None,
    count: int = 50,
    offset: int = 0,
) -> tuple[list[Stored], int]:
    from gateway.store.access import where as gate

    where = [gate(scope, H)]
    if res_type:
        where.append(H.c.res_type == res_type)
    if res_id:
        where.append(H.c.res_id == res_id)
    if since is not None:
        where.append(H.c.lu_ts >= since)
    total = (await conn.execute(select(func.count()).select_from(H).where(*where))).scalar_one()
    rows = await conn.execute(
        select(H).where(*where).order_by(H.c.lu_ts.desc(), H.c.version.desc()).limit(count).offset(offset)
    )
    return [
        Stored(None, r.res_type, r.res_id, r.version, r.last_updated, r.method == "DELETE", r.patient_id, r.content)
        for r in rows
    ], total
