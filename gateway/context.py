"""Who is asking and why: the Requester built by authentication and the purpose of use.

Authentication decides nothing; the consent gate (``gateway.services.consent``) turns a Requester and
a purpose into an :class:`~gateway.store.scope.AccessScope`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

#: Roles known to the gateway: clinical roles act for treatment.
ROLES = frozenset({"ehr-system", "pacs", "clinician", "analyst", "site", "admin"})
CLINICAL_ROLES = frozenset({"ehr-system", "pacs", "clinician"})

TREATMENT = "treatment"


@dataclass(frozen=True, slots=True)
class Purpose:
    """Purpose of use: ``treatment`` (clinical care) or research expressed in DUO terms + diseases."""

    kind: str = TREATMENT  # "treatment" | "research"
    codes: tuple[str, ...] = ()
    diseases: tuple[str, ...] = ()

    @property
    def is_treatment(self) -> bool:
        return self.kind == TREATMENT

    def describe(self) -> str:
        return "treatment" if self.is_treatment else "research:" + ",".join(self.codes + self.diseases)


@dataclass(frozen=True, slots=True)
class Requester:
    subject: str
    roles: frozenset[str] = frozenset()
    organization: str | None = None
    #: Attested attributes DUO modifiers need (not_for_profit, irb_approved, location, ...).
    attributes: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    purpose: Purpose = Purpose()
    token_id: str | None = None
    #: True for a token whose SMART scopes grant reads only (``user/*.read``, ``system/*.rs``): writes → 403
    read_only: bool = False
    #: resource types the token's scopes grant (SMART ``system/Patient.read``); None = every type
    resource_types: frozenset[str] | None = None
    #: the one patient whose compartment a SMART ``patient/`` token may read (the gate narrows every scope to
    #: it: gateway.store.scope.AccessScope.for_patient); None = not bound to a patient
    patient: str | None = None

    def has_role(self, *roles: str) -> bool:
        return bool(self.roles.intersection(roles))

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


#: The identity used by in-process jobs and the CLI when acting for the site itself.
SYSTEM = Requester("system", frozenset({"admin", "site"}), None, {}, Purpose())
