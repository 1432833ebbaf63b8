"""The one access layer: every read of patient data is built here, from an :class:`Access`.

Nothing else in the code base may query a patient table (``fhir_resource``, ``fhir_history``,
``fhir_link``, ``idx_*``, ``cm_*``, ``dcm_*``) for reading.  An :class:`Access` is the only thing that
hands out the consent predicate of such a table, and one is obtained only from the gate's decision for a
requester (:meth:`AccessLayer.open`, which also audits a refusal): **no scope, no query builder**.

API (stable; helpers building DICOM/OMOP/federation/inference paths use exactly this)::

    layer = AccessLayer(db, gate, audit)          # built once, in gateway/app.py (app[keys.ACCESS])
    access = await layer.open(requester)          # the gate decides; a refusal is audited, Forbidden raised
    access.scope                                  # the AccessScope (read-only; for repo functions)
    access.restricted                             # True for research scopes (False: treatment / site)
    access.where(table)                           # SQL predicate: rows of `table` this access may see
    access.select(table, *cols)                   # SELECT cols FROM table WHERE <that predicate>
    access.visible_patients()                     # SELECT of visible cm_patient ids (None: every patient)
    async with access.read() as conn: ...         # a read connection (Database.read)
    await access.read_rows(stmt, params)          # / access.read_sync(fn): Database's fast read paths
    await access.record(Action.READ, Interaction.READ, Outcome.SUCCESS,
                        resources=("Patient/x",), patients=("x",), detail="...")   # the audit record

``where(table)`` knows how each patient table is gated (:data:`GATED`): tables stamped with their rows'
``consent_no`` (one integer IN test, :meth:`AccessScope.row_clause`), tables keyed by ``patient_id``
(:meth:`AccessScope.patient_clause`), and the per-version FHIR history / link tables (every patient
linked to the version must be visible: :func:`version_visible`).  A table not registered raises
``KeyError`` — register it here rather than hand-writing a predicate elsewhere.

Patient links (the multi-patient rule).  A FHIR resource version belongs to *every* patient it
references (``mappings.fhir.links``): ``fhir_link`` holds one row per (resource, version, patient),
written with the version (``fhir_repo.apply_writes``).  The current row's ``consent_no`` is the number
of its patients' common profile (one patient or all with the same profile), of a *combined* profile
(``consent_schema.combined_key``: permitted only when each member is) or NULL (a patient without an
effective profile, or an unknown patient: :data:`mappings.fhir.links.UNKNOWN`) — so research scopes see
a resource only when every linked patient is permitted, at the cost of the same one ``IN`` test.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from sqlalchemy import ColumnElement, Table, and_, not_, select, true
from sqlalchemy.sql import Select

from gateway.store import schema as s
from gateway.store.scope import AccessScope

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import Requester
    from gateway.services.access import Action, AuditSink, Gate, Interaction, Outcome
    from gateway.store.db import Database


def version_visible(scope: AccessScope, res_type, res_id, version) -> ColumnElement:
    """Predicate: every patient linked to that resource version (``fhir_link``) is visible in ``scope``
    (a version with no patient link is visible).  Correlate it with any table carrying the three keys."""
    if scope.unrestricted:
        return true()
    L = s.fhir_link
    allowed = scope.patient_ids_subquery()
    hidden = select(L.c.patient_id).where(
        L.c.res_type == res_type, L.c.res_id == res_id, L.c.version == version,
        not_(L.c.patient_id.in_(allowed)),
    ).exists()
    return not_(hidden)


def _history_clause(scope: AccessScope, table: Table) -> ColumnElement:
    """A history version is visible when its own links are and the resource's *current* row is visible
    and, for research scopes, not deleted (a deleted resource answers like one that never existed)."""
    if scope.unrestricted:
        return true()
    R = s.fhir_resource
    current = select(R.c.rid).where(
        R.c.res_type == table.c.res_type, R.c.res_id == table.c.res_id, R.c.deleted.is_(False),
        scope.row_clause(R.c.consent_no),
    ).exists()
    return and_(current, version_visible(scope, table.c.res_type, table.c.res_id, table.c.version))


def _gates() -> dict[str, object]:
    from gateway.store import dicom_schema as d

    gates: dict[str, object] = {}
    for t in (s.fhir_resource, d.dcm_study, d.dcm_series, d.dcm_instance, d.dcm_study_part, d.dcm_series_part,
              *s.INDEX_TABLES.values()):
        gates[t.name] = ("row", "consent_no")
    for t in (*s.CM_TABLES.values(), s.cm_imaging_series):
        gates[t.name] = ("patient", "patient_id")
    gates[s.fhir_history.name] = ("history", None)
    gates[s.fhir_link.name] = ("history", None)
    return gates


#: table name → how it is gated: ("row", consent_no column) | ("patient", patient column) | ("history", None)
GATED: dict[str, object] = {}


def gated_tables() -> frozenset[str]:
    """Names of the tables only this module may build reads of (the grep-level test's list)."""
    if not GATED:
        GATED.update(_gates())
    return frozenset(GATED)


def require_scope(scope: AccessScope) -> AccessScope:
    """``scope`` itself, when it is one: builders of patient reads call this first (no scope, no query —
    ``None`` never means "everything"; an unrestricted scope is a decision of the gate too)."""
    if not isinstance(scope, AccessScope):
        raise TypeError("a read of patient data needs the AccessScope the consent gate gave the requester")
    return scope


def where(scope: AccessScope, table: Table) -> ColumnElement:
    """The consent predicate for rows of ``table`` (a registered patient table)."""
    require_scope(scope)
    if not GATED:
        GATED.update(_gates())
    kind, col = GATED[table.name]  # KeyError: not a registered patient table
    if kind == "row":
        return scope.row_clause(table.c[col])
    if kind == "patient":
        return scope.patient_clause(table.c[col])
    return _history_clause(scope, table)


class Access:
    """One request's access to patient data: the gate's decision (scope) for one requester, the query
    builder that applies it, and its audit.  Built only by :meth:`AccessLayer.open`."""

    __slots__ = ("requester", "scope", "_db", "_audit")

    def __init__(self, requester: "Requester", scope: AccessScope, db: "Database | None", audit: "AuditSink | None"):
        self.requester = requester
        self.scope = scope
        self._db = db
        self._audit = audit

    @property
    def restricted(self) -> bool:
        return not self.scope.unrestricted

    def where(self, table: Table) -> ColumnElement:
        return where(self.scope, table)

    def select(self, table: Table, *cols) -> Select:
        return select(*(cols or (table,))).where(where(self.scope, table))

    def visible_patients(self) -> Select | None:
        return self.scope.patient_ids_subquery()

    @asynccontextmanager
    async def read(self) -> AsyncIterator:
        async with self._db.read() as conn:
            yield conn

    async def read_rows(self, stmt, params: dict) -> list[dict]:
        """One built SELECT's rows as dicts (``Database.read_rows``: the hot single-statement path)."""
        return await self._db.read_rows(stmt, params)

    async def read_sync(self, fn):
        """``fn(conn)`` on a synchronous connection, several statements in one hand-over (``Database.read_sync``)."""
        return await self._db.read_sync(fn)

    async def record(self, action: "Action", interaction: "Interaction | str", outcome: "Outcome", *,
                     resources=(), patients=(), detail: str = "", path: str = "", extra: dict | None = None) -> None:
        """Write the audit record of this access (PHI-free: references, codes and counts only)."""
        if self._audit is None:
            return
        from gateway.services.access import AccessRecord

        await self._audit.record(AccessRecord(
            self.requester, action, interaction, outcome, tuple(resources)[:200],
            tuple(sorted({p for p in patients if p}))[:200], self.scope.summary, detail, path, extra or {}))


class AccessLayer:
    """Built once in the composition root; services get their :class:`Access` from it."""

    def __init__(self, db: "Database | None", gate: "Gate", audit: "AuditSink") -> None:
        self.db = db
        self.gate = gate
        self.audit = audit

    async def open(self, requester: "Requester") -> Access:
        """The requester's access: the gate's scope (a refusal raises Forbidden, audited by the gate)."""
        scope = await self.gate.scope_for(requester)
        return Access(requester, scope, self.db, self.audit)


__all__ = ["Access", "AccessLayer", "gated_tables", "require_scope", "version_visible", "where"]
