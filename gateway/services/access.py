"""Seams the consent gate and audit plug into (gateway/services/consent.py and audit.py implement them).

Every service asks :class:`Gate` for the :class:`~gateway.store.scope.AccessScope` of a request and
reports each data access to :class:`AuditSink`.  Until the consent gate is configured the gateway
runs with :class:`OpenGate` (every request unrestricted) and :class:`NullAudit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.context import Requester
from gateway.store.scope import UNRESTRICTED, AccessScope


# The typed audit codes (one definition: gateway/services/audit_codes.py), re-exported for the access layer.
from gateway.services.audit_codes import Action, Interaction, Outcome


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One audited access (PHI-free: resource references, not content)."""

    requester: Requester
    action: Action | str  # C | R | U | D | E (FHIR AuditEvent.action)
    interaction: Interaction | str  # read | vread | search | create | update | delete | history | ...
    outcome: Outcome | str  # "0" success, "4" minor failure, "8" serious failure (AuditEvent.outcome)
    resources: tuple[str, ...] = ()  # "Type/id"
    patients: tuple[str, ...] = ()
    scope_summary: str = ""
    detail: str = ""
    path: str = ""
    extra: dict = field(default_factory=dict)


#: Roles that may write data: the systems and people acting for treatment, the site and
#: admins.  Analysts (research) only read; otherwise they could write a Consent granting themselves access.
WRITE_ROLES = frozenset({"ehr-system", "pacs", "clinician", "site", "admin"})


def require_write(requester: Requester) -> None:
    """Raise Forbidden unless ``requester`` may write data."""
    if requester.read_only:
        from gateway.errors import Forbidden

        raise Forbidden("the token's SMART scopes grant reads only (ask for user/*.write or user/*.cud; "
                        "patient/ scopes never write here)")
    if not requester.has_role(*WRITE_ROLES):
        from gateway.errors import Forbidden

        raise Forbidden(f"role(s) {', '.join(sorted(requester.roles)) or 'none'} may not write data; "
                        f"writers: {', '.join(sorted(WRITE_ROLES))}")


def require_type(requester: Requester, res_type: str) -> None:
    """Raise Forbidden unless the token's SMART scopes grant ``res_type`` (``patient/Observation.read``)."""
    if requester.resource_types is not None and res_type not in requester.resource_types:
        from gateway.errors import Forbidden

        raise Forbidden(f"the token's SMART scopes do not grant {res_type} (granted: "
                        f"{', '.join(sorted(requester.resource_types))})")


class Gate(Protocol):
    async def scope_for(self, requester: Requester) -> AccessScope: ...


class AuditSink(Protocol):
    async def record(self, event: AccessRecord) -> None: ...


class OpenGate:
    async def scope_for(self, requester: Requester) -> AccessScope:
        return UNRESTRICTED.for_patient(requester.patient) if requester.patient is not None else UNRESTRICTED


class NullAudit:
    async def record(self, event: AccessRecord) -> None:
        return None
