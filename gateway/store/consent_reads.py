"""Reads of the consent view (issue 28, docs/ui.md): patients per effective consent profile, withdrawn
Consents by day, one patient's profile — each under the requester's scope (``gateway.store.access.where``),
so a steward sees the patients the gate lets them see and nothing else."""

from __future__ import annotations

from sqlalchemy import func, select

from gateway.store.access import where
from gateway.store.schema import cm_consent, cm_patient, fhir_resource
from gateway.store.scope import AccessScope

#: Consent.status values that withdraw a consent (docs/consent.md, "Accepted Consent profile").
WITHDRAWN = ("inactive", "rejected", "entered-in-error")


async def patients_per_profile(conn, scope: AccessScope) -> dict[str | None, int]:
    """Effective profile key (None: no profile, i.e. nothing permits) → number of visible patients."""
    stmt = (select(cm_patient.c.consent_profile, func.count(func.distinct(cm_patient.c.patient_id)))
            .where(where(scope, cm_patient)).group_by(cm_patient.c.consent_profile))
    return {k: int(n) for k, n in (await conn.execute(stmt)).all()}


async def withdrawals_by_day(conn, scope: AccessScope) -> list[tuple[str, int]]:
    """(YYYY-MM-DD, withdrawn Consents) by the day their current version was written, oldest first: Consents
    of visible patients whose status withdraws them."""
    day = func.substr(fhir_resource.c.last_updated, 1, 10)
    stmt = (select(day, func.count()).select_from(cm_consent.join(fhir_resource, (fhir_resource.c.res_type == "Consent")
                                                                  & (fhir_resource.c.res_id == func.substr(cm_consent.c.src_id, 9))))
            .where(cm_consent.c.src_type == "fhir", cm_consent.c.status.in_(WITHDRAWN),
                   fhir_resource.c.deleted.is_(False), where(scope, cm_consent), where(scope, fhir_resource))
            .group_by(day).order_by(day))
    return [(d, int(n)) for d, n in (await conn.execute(stmt)).all()]


async def patient_profile(conn, scope: AccessScope, patient_id: str) -> tuple[bool, str | None, list[tuple[str, str]]]:
    """(visible?, effective profile key, [(Consent source, status)]) of one patient under ``scope``."""
    row = (await conn.execute(select(cm_patient.c.consent_profile).where(
        cm_patient.c.patient_id == patient_id, where(scope, cm_patient)).limit(1))).first()
    if row is None:
        return False, None, []
    consents = (await conn.execute(select(cm_consent.c.src_id, cm_consent.c.status).where(
        cm_consent.c.patient_id == patient_id, where(scope, cm_consent)).order_by(cm_consent.c.src_id))).all()
    return True, row[0], [(s, st or "") for s, st in consents]


__all__ = ["WITHDRAWN", "patient_profile", "patients_per_profile", "withdrawals_by_day"]
