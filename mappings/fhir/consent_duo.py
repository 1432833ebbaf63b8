"""FHIR R4 Consent (with GA4GH DUO codes) → DUO consent entries; site policy collections → entries.

Pure functions (docs/consent.md, "Accepted Consent profile").  A Consent contributes one *entry*
(a :class:`ontologies.ConsentProfile` plus its validity window) when it carries DUO codings:

* DUO codings anywhere in ``policyRule.coding``, ``provision.purpose`` and ``provision.code[].coding``
  (system ``http://purl.obolibrary.org/obo/duo`` — any case — or a code given as ``DUO:nnnnnnn`` /
  OBO IRI).  Exactly one must be a permission (NRES/GRU/HMB/DS/POA); the others are modifiers.
  Zero or several permissions make a profile that fails closed.
* Disease restrictions: ``provision.code[].coding`` with MONDO / DOID / SNOMED CT / OBO-IRI systems.
* Parameters: extensions ``<EXT>moratorium-until`` (valueDate), ``<EXT>time-limit-months``
  (valueInteger), ``<EXT>region``/``user``/``project``/``institution``/``topic`` (valueString or
  valueCode, repeatable), ``<EXT>collaborator`` (valueString), on the Consent or its provision.
  TS's start (``granted_on``) is ``provision.period.start``, else ``dateTime``.
* ``provision.period`` bounds the entry (checked at request time); ``status`` other than ``active``
  contributes nothing (withdrawal = status ``inactive``/``rejected`` or delete).
* ``provision.type = deny`` on an active Consent is an opt-out: the patient is invisible to research
  whatever else applies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from ontologies.evaluator import ConsentInputError, ConsentParameters, ConsentProfile
from ontologies.terms import TermError, normalize_curie

EXT = "https://fedgate.dev/fhir/StructureDefinition/duo-"
DUO_SYSTEMS = frozenset(
    {
        "http://purl.obolibrary.org/obo/duo",
        "http://purl.obolibrary.org/obo/duo.owl",
        "https://purl.obolibrary.org/obo/duo",
        "urn:ga4gh:duo",
    }
)
PERMISSIONS = frozenset({"DUO:0000004", "DUO:0000042", "DUO:0000006", "DUO:0000007", "DUO:0000011"})
#: Disease coding systems → CURIE prefix.
DISEASE_SYSTEMS = {
    "http://purl.obolibrary.org/obo/mondo": "MONDO",
    "http://purl.obolibrary.org/obo/mondo.owl": "MONDO",
    "http://purl.obolibrary.org/obo/doid": "DOID",
    "http://purl.obolibrary.org/obo/doid.owl": "DOID",
    "http://snomed.info/sct": "SCTID",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
}
#: The permission used when a Consent's DUO codes do not name exactly one (fails closed).
INVALID_PERMISSION = "FEDGATE:no-single-duo-permission"


@dataclass(frozen=True, slots=True)
class Entry:
    """One source of permission for a patient: a DUO profile valid on [start, end] (ISO dates)."""

    profile: ConsentProfile
    start: str | None = None
    end: str | None = None
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile.to_json(), "start": self.start, "end": self.end, "source": self.source}

    def active_on(self, day: str) -> bool:
        return (self.start is None or self.start[:10] <= day) and (self.end is None or day <= self.end[:10])


def _codings(resource: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    for rule in [resource.get("policyRule") or {}]:
        yield from rule.get("coding") or ()
    provision = resource.get("provision") or {}
    yield from provision.get("purpose") or ()
    for cc in provision.get("code") or ():
        yield from cc.get("coding") or ()


def _duo_code(coding: Mapping[str, Any]) -> str | None:
    code = str(coding.get("code") or "").strip()
    system = str(coding.get("system") or "").rstrip("/").lower()
    if not code:
        return None
    if system in DUO_SYSTEMS:
        code = code if ":" in code or code.startswith("http") else f"DUO:{code}"
    elif not (code.upper().startswith("DUO:") or "/obo/DUO_" in code):
        return None
    try:
        curie = normalize_curie(code)
    except TermError:
        return None
    return curie if curie.startswith("DUO:") else None


def _disease_code(coding: Mapping[str, Any]) -> str | None:
    code = str(coding.get("code") or "").strip()
    system = str(coding.get("system") or "").rstrip("/")
    if not code:
        return None
    prefix = DISEASE_SYSTEMS.get(system) or DISEASE_SYSTEMS.get(system.lower())
    if prefix:
        return code if ":" in code else f"{prefix}:{code}"
    if "/obo/" in code and "/obo/DUO_" not in code:
        try:
            return normalize_curie(code)
        except TermError:
            return None
    return None


def _ext_values(exts: Iterable[Mapping[str, Any]], name: str) -> list[Any]:
    out = []
    for ext in exts:
        if ext.get("url") == EXT + name:
            for key, value in ext.items():
                if key.startswith("value"):
                    out.append(value)
    return out


def entry_from_consent(resource: Mapping[str, Any]) -> Entry | None | bool:
    """The DUO entry of an *active* Consent, ``None`` when it carries no DUO terms or is not active,
    ``False`` when it is an active opt-out (``provision.type = deny``)."""
    if resource.get("status") != "active":
        return None
    provision = resource.get("provision") or {}
    if provision.get("type") == "deny":
        return False
    duo = sorted({c for c in map(_duo_code, _codings(resource)) if c})
    if not duo:
        return None
    perms = [c for c in duo if c in PERMISSIONS]
    permission = perms[0] if len(perms) == 1 else INVALID_PERMISSION
    modifiers = [c for c in duo if c not in PERMISSIONS]
    diseases = sorted(
        {d for cc in provision.get("code") or () for d in map(_disease_code, cc.get("coding") or ()) if d}
    )
    exts = list(resource.get("extension") or ()) + list(provision.get("extension") or ())
    period = provision.get("period") or {}
    start = period.get("start") or None
    months = _ext_values(exts, "time-limit-months")
    mor = _ext_values(exts, "moratorium-until")
    collab = _ext_values(exts, "collaborator")
    granted = (start or resource.get("dateTime") or "")[:10] or None
    try:
        params = ConsentParameters(
            moratorium_until=date.fromisoformat(str(mor[0])[:10]) if mor else None,
            time_limit_months=months[0] if months else None,
            granted_on=date.fromisoformat(granted) if months and granted else None,
            regions=_ext_values(exts, "region"),  # type: ignore[arg-type]
            users=_ext_values(exts, "user"),  # type: ignore[arg-type]
            projects=_ext_values(exts, "project"),  # type: ignore[arg-type]
            institutions=_ext_values(exts, "institution"),  # type: ignore[arg-type]
            collaborator=str(collab[0]) if collab else None,
            topics=_ext_values(exts, "topic"),  # type: ignore[arg-type]
        )
        profile = ConsentProfile(
            permission=permission, modifiers=frozenset(modifiers), diseases=frozenset(diseases), parameters=params
        )
    except (ConsentInputError, ValueError):
        profile = ConsentProfile(permission=INVALID_PERMISSION)
    rid = "Consent"  # not the id: patients with equal consents share one effective profile
    return Entry(profile, start[:10] if start else None, (period.get("end") or None) and period["end"][:10], rid)


# ---------------------------------------------------------------------------------------------
# Site policy: DUO terms for collections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Collection:
    name: str
    profile: ConsentProfile
    identifier_systems: frozenset[str] = frozenset()
    identifier_prefixes: frozenset[str] = frozenset()
    sex: frozenset[str] = frozenset()
    born_from: int | None = None
    born_to: int | None = None
    start: str | None = None
    end: str | None = None

    def matches(self, identifiers: Iterable[str], sex: str | None, birth_year: int | None) -> bool:
        idents = list(identifiers)
        if self.identifier_systems and not any(i.split("|", 1)[0] in self.identifier_systems for i in idents):
            return False
        if self.identifier_prefixes and not any(
            i.split("|", 1)[-1].startswith(tuple(self.identifier_prefixes)) for i in idents
        ):
            return False
        if self.sex and sex not in self.sex:
            return False
        if self.born_from is not None and (birth_year is None or birth_year < self.born_from):
            return False
        if self.born_to is not None and (birth_year is None or birth_year > self.born_to):
            return False
        return True

    def entry(self) -> Entry:
        return Entry(self.profile, self.start, self.end, f"policy:{self.name}")


class PolicyError(ValueError):
    pass


def parse_policy(doc: Mapping[str, Any]) -> tuple[Collection, ...]:
    """Parse the site policy document (docs/consent.md, "Site policy"); errors name the field."""
    out = []
    for n, item in enumerate(doc.get("collections") or ()):
        where = f"collections[{n}]"
        if not isinstance(item, Mapping) or not item.get("name"):
            raise PolicyError(f"{where}.name: required")
        match = item.get("match") or {}
        if not match:
            raise PolicyError(f"{where}.match: required (a policy never applies to every patient implicitly)")
        try:
            profile = ConsentProfile.from_json(item.get("consent"), path=f"{where}.consent")
        except ConsentInputError as err:
            raise PolicyError(str(err)) from err
        period = item.get("period") or {}
        out.append(
            Collection(
                str(item["name"]),
                profile,
                frozenset(
                    match.get("identifier_system")
                    and [match["identifier_system"]]
                    or match.get("identifier_systems")
                    or ()
                ),
                frozenset(match.get("identifier_prefixes") or ()),
                frozenset(match.get("sex") or ()),
                match.get("born_from"),
                match.get("born_to"),
                period.get("start"),
                period.get("end"),
            )
        )
    return tuple(out)


def effective(entries: Iterable[Entry], opt_out: bool) -> dict[str, Any] | None:
    """Canonical effective profile of one patient (None: nothing permits anything)."""
    if opt_out:
        return None
    items = sorted((e.to_json() for e in entries), key=lambda e: json.dumps(e, sort_keys=True))
    if not items:
        return None
    return {"v": 1, "entries": items}


def profile_key(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entries_of(doc: Mapping[str, Any]) -> list[Entry]:
    return [
        Entry(ConsentProfile.from_json(e["profile"]), e.get("start"), e.get("end"), e.get("source", ""))
        for e in doc.get("entries") or ()
    ]
