"""AccessScope: what the consent gate lets one request see, as SQL.

The gate evaluates consent per *profile* (few) not per record (many): a restricted scope carries the
set of ConsentProfile keys permitted for the request's purpose and requester, and every read path
adds :meth:`AccessScope.patient_clause` to its WHERE clause.  Resources outside any Patient
compartment (Organization, Practitioner, ...) carry no patient data and stay visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, false, or_, select, true

from gateway.store.schema import cm_patient


@dataclass(frozen=True, slots=True)
class AccessScope:
    #: True for treatment (clinical roles) and site administration: no research filter, still audited.
    unrestricted: bool = True
    #: ConsentProfile keys whose patients are visible (only meaningful when restricted).
    allowed_profiles: frozenset[str] = frozenset()
    #: A short, PHI-free description for audit records ("research DUO:0000040 → 12/130 profiles").
    summary: str = "unrestricted"

    def patient_clause(self, patient_col: ColumnElement, *, allow_no_patient: bool = True) -> ColumnElement:
        """SQL predicate: the row's patient is visible in this scope."""
        if self.unrestricted:
            return true()
        if not self.allowed_profiles:
            return patient_col.is_(None) if allow_no_patient else false()
        allowed = select(cm_patient.c.patient_id).where(
            cm_patient.c.consent_profile.in_(sorted(self.allowed_profiles))
        )
        visible = patient_col.in_(allowed)
        return or_(patient_col.is_(None), visible) if allow_no_patient else visible

    def row_clause(self, patient_col: ColumnElement, profile_col: ColumnElement) -> ColumnElement:
        """Like :meth:`patient_clause` for tables that carry the patient's consent profile key on the
        row itself (``fhir_resource.consent_profile``): no per-row subquery."""
        if self.unrestricted:
            return true()
        if not self.allowed_profiles:
            return patient_col.is_(None)
        return or_(patient_col.is_(None), profile_col.in_(sorted(self.allowed_profiles)))

    def patient_ids_subquery(self):
        """SELECT of visible patient ids (None when unrestricted: every patient)."""
        if self.unrestricted:
            return None
        if not self.allowed_profiles:  # nobody (no NUL-byte sentinel: PostgreSQL rejects it)
            return select(cm_patient.c.patient_id).where(false())
        return select(cm_patient.c.patient_id).where(cm_patient.c.consent_profile.in_(sorted(self.allowed_profiles)))


UNRESTRICTED = AccessScope()
