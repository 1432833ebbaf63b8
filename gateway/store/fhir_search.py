"""FHIR search execution: a parsed :class:`~mappings.fhir.search.SearchQuery` as SQL over the resource table
and the search index — the driving index lookup with the consent gate inside it, keyset paging,
``_sort``, ``_total``, ``_include``/``_revinclude``.

Part of the FHIR store (:mod:`gateway.store.fhir_repo` re-exports its public names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from sqlalchemy import and_, case, func, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store import schema as s
from gateway.store.fhir_reads import _COLS, R, Stored, _stored, get_many
from gateway.store.scope import AccessScope
from mappings.fhir.search import ANY, Clause, SearchQuery


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
    if not nullable:  # the bound on the first column alone too: an index range seek on it (not an OR of two)
        return and_((col <= v) if desc else (col >= v), or_(beyond, rest))
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


#: date prefixes whose matches are one range of the stored range's end (hi) or start (lo): the column walked
_DATE_WALK = {"gt": "hi", "ge": "hi", "eb": "hi", "lt": "lo", "le": "lo", "eq": "lo", "sa": "lo"}


def _walk(q: SearchQuery) -> tuple[Clause, str] | None:
    """The range clause that drives ``q`` as a walk of its index in value order, and the column walked
    (``_lastUpdated``: ``fhir_resource.lu_ts``; a date: the index's ``hi`` or ``lo``; a quantity: ``value``).

    In rid order a page of a range search is picked from every match (``rid IN (...)``: 10^5 rows for a
    broad range at 1M resources) or found by scanning resources until enough match (slow for a narrow one);
    walked in the index's order, a page reads its ``_count`` + 1 rows from where the previous one stopped,
    broad or narrow.  The keyset is then (value, rid) — FHIR leaves the order of a search without ``_sort`` to
    the server (R4 §3.1.1.4.7), and the cursor keeps the paging stable and complete.  None: rid order
    (``_sort``, a compartment, several values or a modifier, another clause drives, ``storage_order``)."""
    if q.sort or q.compartment is not None or q.storage_order or not q.clauses:
        return None
    ordered = sorted(q.clauses, key=_selectivity)
    c = ordered[0]
    if _drives(c):
        if len(c.values) != 1 or c.modifier is not None:
            return None
        if c.param.type == "quantity" and c.values[0][0] not in ("ne", "ap"):
            return c, "value"
        if c.param.type == "date" and c.values[0][0] in _DATE_WALK:
            return c, _DATE_WALK[c.values[0][0]]
        return None
    if _selectivity(c) != 9:  # (_id)
        return None
    lu = [x for x in ordered if x.param.name == "_lastUpdated" and x.modifier is None]
    return (lu[0], "lu_ts") if lu else None


def keyset_width(q: SearchQuery) -> int:
    """How many values the keyset of ``q``'s pages has (``SearchResult.last_key``, a cursor's ``after``):
    the ``_sort`` keys, the walked value (:func:`_walk`), then rid."""
    if q.storage_order:
        return 1
    return len(q.sort) + (2 if _walk(q) is not None else 1)


def _walk_statement(q: SearchQuery, scope: AccessScope, c: Clause, col: str, after: tuple | None, limit: int,
                    offset: int = 0):
    """One page of ``q`` walking ``c``'s index in (``col``, rid) order (:func:`_walk`; not ``_lastUpdated``,
    which is ``page_statement``'s order by lu_ts).  A resource with several matching values comes once, at
    its least: a row with an earlier matching value of the same resource is skipped (and rows repeating the
    same value come together: :func:`_distinct_rids`)."""
    index = s.INDEX_TABLES[c.param.type]
    walk, other = index.alias("walk"), index.alias("dup")
    key = walk.c[col]
    preds = [walk.c.res_type == q.res_type, walk.c.param == c.param.name, _value_pred(c, walk, c.values[0])]
    if not scope.unrestricted:  # the gate inside the index walk (its rows carry the resource's consent_no)
        preds.append(scope.row_clause(walk.c.consent_no))
    if after is not None:
        preds.append(keyset_after([(key, False, False), (walk.c.rid, False, False)], after))
    # an earlier matching value of the same resource: looked up by rid alone — the rest is one opaque test
    # (CASE), so neither engine serves the probe from the value index (a range of every earlier match, per
    # row: quadratic in the page number — what both planners chose with stale statistics)
    earlier_value = and_(other.c.res_type == q.res_type, other.c.param == c.param.name, other.c[col] < key,
                         _value_pred(c, other, c.values[0]))
    earlier = select(other.c.rid).where(other.c.rid == walk.c.rid, case((earlier_value, 1), else_=0) == 1).exists()
    others = [clause_sql(x, q.res_type, driving=False) for x in sorted(q.clauses, key=_selectivity)[1:]]
    stmt = (select(*_COLS, key.label("k0")).select_from(walk.join(R, R.c.rid == walk.c.rid))
            .where(*preds, not_(earlier), R.c.deleted.is_(False), *others).order_by(key, walk.c.rid).limit(limit))
    return stmt.offset(offset) if offset else stmt


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
    walk = _walk(q)
    if walk is not None and walk[1] != "lu_ts":
        return _walk_statement(q, scope, *walk, q.after, q.count + 1, q.offset if q.after is None else 0), 2
    after_rid = q.after[-1] if q.after is not None and not q.sort and walk is None else None
    if (c := _streamed(q)) is not None:
        return _streamed_statement(q, scope, c, after_rid, q.count + 1), 1
    keys = [(col, d, nullable) for p, d in q.sort for col, nullable in [_sort_col(q.res_type, p, d)]]
    if walk is not None:  # _lastUpdated: (type, lu_ts) index order
        keys.append((R.c.lu_ts, False, False))
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


async def _distinct_rids(conn: AsyncConnection, q: SearchQuery, scope: AccessScope, c: Clause, rows: list,
                         col: str | None = None) -> list:
    """A streamed page (:func:`_streamed`) or a walked one (:func:`_walk`, ``col``) without the repeats of a
    resource that has the value twice (two codings with the same code): they come together (rid order, or
    (value, rid) order); when dropping them leaves the page short, the walk goes on after the last row read."""
    want = q.count + 1
    out: list = []
    batch = rows
    while True:
        for r in batch:
            if not out or r.rid != out[-1].rid:
                out.append(r)
        if len(batch) < want or len(out) >= want:
            return out[:want]
        stmt = (_streamed_statement(q, scope, c, batch[-1].rid, want) if col is None
                else _walk_statement(q, scope, c, col, (batch[-1].k0, batch[-1].rid), want))
        batch = (await conn.execute(stmt)).all()


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
    elif (walk := _walk(q)) is not None and walk[1] != "lu_ts":
        rows = await _distinct_rids(conn, q, scope, walk[0], rows, walk[1])
    more = len(rows) > q.count
    rows = rows[:q.count]
    matches = [_stored(r) for r in rows]
    last_key = (*(getattr(rows[-1], f"k{n}") for n in range(nkeys - 1)), rows[-1].rid) if rows else None
    start = q.offset if q.after is None else q.position
    if total is None and not more and q.total == "estimate" and (matches or not start):
        total = start + len(matches)
    included = await _includes(conn, q, matches, scope) if matches and (q.includes or q.revincludes) else []
    return SearchResult(matches, total, included, more=more, last_key=last_key)


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
