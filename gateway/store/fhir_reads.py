"""FHIR resource reads: the stored row (:class:`Stored`), the pending change (:class:`Write`), current
versions, single versions and history, each in the caller's access scope where it reads patient data.

Part of the FHIR store (:mod:`gateway.store.fhir_repo` re-exports its public names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import orjson
from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store import schema as s
from gateway.store.db import built_once
from gateway.store.scope import AccessScope
from mappings.fhir.links import patient_links

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
    #: a version derived from another store (the ImagingStudy the DICOM index maintains): it replaces the
    #: previous version in history when that one was derived too, so history keeps the latest derived version
    #: and every version a FHIR client wrote — not one whole-study copy per STOW request
    derived: bool = False


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


async def visible_types(conn: AsyncConnection, scope: AccessScope) -> list[str]:
    """The resource types of which ``scope`` sees at least one current resource (Bulk Data ``$export``
    without ``_type``), sorted."""
    from gateway.store.access import where

    rows = await conn.execute(select(R.c.res_type).where(R.c.deleted.is_(False), where(scope, R)).distinct())
    return sorted(r.res_type for r in rows)


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
