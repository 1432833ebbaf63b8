"""Which requester gets de-identified data, with which keys (issue #24; docs/deidentification.md).

The pure de-identifiers live in :mod:`mappings.deid`; this module binds them to the site's settings:
``deid_policy`` (role/purpose → ``identified`` | ``deidentified``), ``deid_secret`` and the project the
requester's token names (attribute ``project``, else ``[export] project``, else the site id — the same
project, hence the same pseudonyms and date offsets, as the FHIR bulk export uses).  The secret is only ever handed to
:class:`~mappings.deid.keys.ProjectKeys` (whose repr hides it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.context import Requester
from gateway.settings import Settings
from mappings.deid.dicom import DeidOptions, Withheld
from mappings.deid.keys import ProjectKeys
from mappings.deid.part10 import deidentify_part10

IDENTIFIED = "identified"
DEIDENTIFIED = "deidentified"
MODES = (IDENTIFIED, DEIDENTIFIED)
PURPOSES = ("treatment", "research", "*")


@dataclass(frozen=True, slots=True)
class PolicyRule:
    role: str
    purpose: str
    mode: str


def parse_policy(text: str) -> tuple[PolicyRule, ...]:
    """``role[/purpose]=mode`` entries (comma or space separated); ValueError names the bad entry."""
    rules = []
    for entry in text.replace(",", " ").split():
        lhs, sep, mode = entry.partition("=")
        role, _, purpose = lhs.partition("/")
        purpose = purpose or "*"
        if not sep or not role or mode not in MODES or purpose not in PURPOSES:
            raise ValueError(f"{entry!r} is not role[/treatment|research|*]=identified|deidentified")
        rules.append(PolicyRule(role, purpose, mode))
    return tuple(rules)


class UidIndex:
    """The source Study Instance UID of a project's UID (:meth:`ProjectKeys.uid_for` is one-way), so a client
    of de-identified QIDO-RS / WADO-RS / exports can address a study by the UID it was given.

    Per project, a map ``uid_for(source) → source`` of every stored study, built off the event loop from
    the stored UIDs and rebuilt on a miss (at most every :attr:`REFRESH_S` seconds, so unknown UIDs cannot
    make every request rebuild it).  It only translates: the gated read that follows decides what is
    answered, so a refused study is as absent under its project UID as under its source UID."""

    REFRESH_S = 2.0

    def __init__(self) -> None:
        self._maps: dict[str, dict[str, str]] = {}
        self._built: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def source_study(self, keys: ProjectKeys, uid: str,
                           stored_uids: Callable[[], Awaitable[list[str]]]) -> str | None:
        """The source UID whose project UID is ``uid``, or None (then ``uid`` may be a source UID itself)."""
        found = self._maps.get(keys.project, {}).get(uid)
        if found is not None:
            return found
        async with self._lock:
            found = self._maps.get(keys.project, {}).get(uid)
            if found is not None or time.monotonic() - self._built.get(keys.project, -1e9) < self.REFRESH_S:
                return found
            uids = await stored_uids()
            self._maps[keys.project] = await asyncio.to_thread(lambda: {keys.uid_for(u): u for u in uids})
            self._built[keys.project] = time.monotonic()
            return self._maps[keys.project].get(uid)


class DeidPolicy:
    """The site's de-identification policy and keys."""

    def __init__(self, settings: Settings) -> None:
        self.rules = parse_policy(settings.deid_policy)
        self.wado = settings.deid_wado
        export = settings.extra.get("export") if isinstance(settings.extra.get("export"), dict) else {}
        self.default_project = str(export.get("project") or settings.site_id)
        roles = export.get("deidentify_roles", ("analyst",))
        self.deidentify_roles = frozenset([roles] if isinstance(roles, str) else roles or ())
        self._settings = settings
        self._secret: bytes | None = None
        self.uids = UidIndex()

    def mode_for(self, requester: Requester) -> str:
        """``identified`` or ``deidentified`` for ``requester`` (first matching rule, else by purpose)."""
        purpose = "treatment" if requester.purpose.is_treatment else "research"
        for rule in self.rules:
            if (rule.role == "*" or rule.role in requester.roles) and rule.purpose in ("*", purpose):
                return rule.mode
        if requester.roles & self.deidentify_roles or not requester.purpose.is_treatment:
            return DEIDENTIFIED
        return IDENTIFIED

    def deidentifies(self, requester: Requester) -> bool:
        return self.mode_for(requester) == DEIDENTIFIED

    def wado_deidentifies(self, requester: Requester) -> bool:
        """Whether WADO-RS answers ``requester`` with de-identified instances (setting ``deid_wado``)."""
        return self.wado and self.deidentifies(requester)

    def project_for(self, requester: Requester, project: str | None = None) -> str:
        return project or str(requester.attributes.get("project") or "") or self.default_project

    def keys_for(self, requester: Requester, project: str | None = None) -> ProjectKeys:
        """The keys of the requester's project (or ``project``, e.g. an export's named project)."""
        if self._secret is None:
            self._secret = self._settings.deid_key()
        return ProjectKeys(self.project_for(requester, project), self._secret)


def deidentify_file(path: Path, keys: ProjectKeys, patient_key: str | None,
                    options: DeidOptions | None = None) -> bytes | Withheld:
    """One stored instance file de-identified to Part 10 bytes (blocking: call it off the event loop)."""
    return deidentify_part10(path.read_bytes(), keys, options, patient_key=patient_key)


__all__ = ["DEIDENTIFIED", "IDENTIFIED", "DeidPolicy", "UidIndex", "deidentify_file", "parse_policy"]
