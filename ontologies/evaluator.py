"""The pure DUO consent evaluator: ConsentProfile × ResearchPurpose × Requester → Decision.

DESIGN.md, "The consent gate — one place", step 3; semantics from DUO.md, "Matching semantics a
data-access gateway must implement".  No I/O, no clock: ``today`` is an argument.  The DUO release
(:class:`ontologies.duo_graph.DuoOntology`) and a disease hierarchy
(:class:`ontologies.diseases.DiseaseHierarchy`) are passed in, already loaded.

Rules (docs/consent.md has the full table):

* **AND** over the permission and every modifier (DUO.md: "A request is allowed only if *every*
  dataset condition is satisfied").  Every condition is evaluated, so reasons list all failures.
* **Precedence: deny > indeterminate > permit.**  One failed condition denies; otherwise one
  condition that cannot be decided automatically (a requester attribute that was not attested)
  makes the result indeterminate (DUO.md: peer systems "route these to manual review rather than
  auto-approve"); only when every condition holds is the result permit.
* **Fail closed**: unknown or obsolete codes in the consent or the purpose, a code in the wrong role
  (a modifier used as permission, ...), a consent missing a modifier's parameter, or an unknown
  disease deny with a reason (DUO.md: "Unknown or obsolete codes: fail closed ..., never approve").
* Requester attributes are tri-state: ``True``/``False`` when attested, ``None`` when not.  A
  modifier whose attestation is ``None`` gives indeterminate; an attestation that contradicts the
  modifier gives deny.  Neither ever gives permit.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:  # annotations only: the evaluator itself needs no rdflib (issue 27, CLI start-up)
    from ontologies.diseases import DiseaseHierarchy
    from ontologies.duo_graph import DuoOntology
from ontologies.terms import CLINICAL_CARE_MARKERS, TermError, normalize_curie

__all__ = [
    "PERMIT",
    "DENY",
    "INDETERMINATE",
    "NRES",
    "GRU",
    "HMB",
    "DS",
    "POA",
    "NPU",
    "NCU",
    "NPUNCU",
    "IRB",
    "COL",
    "PUB",
    "RTN",
    "MOR",
    "TS",
    "GS",
    "US",
    "PS",
    "IS",
    "GSO",
    "NMDS",
    "NPOA",
    "RS",
    "CC",
    "CLINICAL_CARE",
    "REGION_GROUPS",
    "ConsentInputError",
    "ConsentParameters",
    "ConsentProfile",
    "ResearchPurpose",
    "Requester",
    "Decision",
    "PurposeKind",
    "purpose_kind",
    "add_months",
    "evaluate",
]

logger = logging.getLogger(__name__)

DecisionValue = Literal["permit", "deny", "indeterminate"]
PERMIT: Final = "permit"
DENY: Final = "deny"
INDETERMINATE: Final = "indeterminate"

# DUO.md, "Class hierarchy": permissions.
NRES: Final = "DUO:0000004"
GRU: Final = "DUO:0000042"
HMB: Final = "DUO:0000006"
DS: Final = "DUO:0000007"
POA: Final = "DUO:0000011"
# DUO.md, "Class hierarchy": modifiers.
RS: Final = "DUO:0000012"
NMDS: Final = "DUO:0000015"
GSO: Final = "DUO:0000016"
NPUNCU: Final = "DUO:0000018"
PUB: Final = "DUO:0000019"
COL: Final = "DUO:0000020"
IRB: Final = "DUO:0000021"
GS: Final = "DUO:0000022"
MOR: Final = "DUO:0000024"
TS: Final = "DUO:0000025"
US: Final = "DUO:0000026"
PS: Final = "DUO:0000027"
IS: Final = "DUO:0000028"
RTN: Final = "DUO:0000029"
CC: Final = "DUO:0000043"
NPOA: Final = "DUO:0000044"
NPU: Final = "DUO:0000045"
NCU: Final = "DUO:0000046"
# DUO.md, "Class hierarchy": investigation (research purpose) terms.
METHODS_RESEARCH: Final = "DUO:0000031"
GENETIC_RESEARCH: Final = "DUO:0000038"
#: A purpose of clinical care: DUO:0000043 used as a purpose code (or a ``clinical-care`` marker).
CLINICAL_CARE: Final = CC

#: GS (DUO:0000022) region groups, besides ISO 3166-1 alpha-2 country codes.  Deliberately small:
#: membership as of 2025 (EU-27 after the UK's exit; EEA = EU + Iceland, Liechtenstein, Norway).
#: Greece is ``GR`` (ISO), not the EU's ``EL``.  Anything else (GAZ terms, "Europe", "UK") is not
#: a known region and fails closed.
_EU = frozenset("AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK".split())
REGION_GROUPS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "EU": _EU,
        "EEA": _EU | {"IS", "LI", "NO"},
    }
)
_COUNTRY = re.compile(r"^[A-Z]{2}$")


class ConsentInputError(ValueError):
    """A consent, purpose or requester value of the wrong type or shape; the message names the field."""


# ---------------------------------------------------------------------------------------------
# Value objects
# ---------------------------------------------------------------------------------------------


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _sha256(obj: Any) -> str:
    return hashlib.sha256(_canonical_json(obj).encode("ascii")).hexdigest()


def _as_date(value: object, name: str) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    raise ConsentInputError(f"{name}: expected a date, got {type(value).__name__}")


def _terms(values: object, name: str) -> frozenset[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConsentInputError(f"{name}: expected a collection of CURIEs/IRIs, got {type(values).__name__}")
    out = set()
    for value in values:
        try:
            out.add(normalize_curie(value))
        except TermError as err:
            raise ConsentInputError(f"{name}: {err}") from err
    return frozenset(out)


def _strings(values: object, name: str, *, upper: bool = False) -> frozenset[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConsentInputError(f"{name}: expected a collection of strings, got {type(values).__name__}")
    out = set()
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ConsentInputError(f"{name}: entries must be non-empty strings, got {value!r}")
        out.add(value.strip().upper() if upper else value.strip())
    return frozenset(out)


def _opt_text(value: object, name: str, *, upper: bool = False) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConsentInputError(f"{name}: expected a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    return text.upper() if upper else text


@dataclass(frozen=True, slots=True)
class ConsentParameters:
    """Values that some modifiers need (DUO.md, "Requester-attested or parameterised checks").

    * ``moratorium_until``: MOR (DUO:0000024) date before which results must not be published.
    * ``time_limit_months`` + ``granted_on``: TS (DUO:0000025) — use is allowed from ``granted_on``
      (the date the consent / data-use approval was granted; the clock's start) for that many months.
    * ``regions``: GS (DUO:0000022) ISO 3166-1 alpha-2 codes or :data:`REGION_GROUPS` names.
    * ``users`` / ``projects`` / ``institutions``: US / PS / IS (DUO:0000026/27/28) allow-lists.
    * ``collaborator``: COL (DUO:0000020) primary investigator to collaborate with (informative).
    * ``topics``: RS (DUO:0000012) research topics (CURIEs, e.g. EDAM topics) the use is limited to.

    Collections are coerced to ``frozenset``; regions are upper-cased; topics are CURIE-normalised.
    """

    moratorium_until: date | None = None
    time_limit_months: int | None = None
    granted_on: date | None = None
    regions: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    projects: frozenset[str] = frozenset()
    institutions: frozenset[str] = frozenset()
    collaborator: str | None = None
    topics: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        setter = object.__setattr__
        setter(self, "moratorium_until", _as_date(self.moratorium_until, "parameters.moratorium_until"))
        setter(self, "granted_on", _as_date(self.granted_on, "parameters.granted_on"))
        months = self.time_limit_months
        if months is not None and (isinstance(months, bool) or not isinstance(months, int) or months < 0):
            raise ConsentInputError(f"parameters.time_limit_months: expected a non-negative integer, got {months!r}")
        setter(self, "regions", _strings(self.regions, "parameters.regions", upper=True))
        setter(self, "users", _strings(self.users, "parameters.users"))
        setter(self, "projects", _strings(self.projects, "parameters.projects"))
        setter(self, "institutions", _strings(self.institutions, "parameters.institutions"))
        setter(self, "collaborator", _opt_text(self.collaborator, "parameters.collaborator"))
        setter(self, "topics", _terms(self.topics, "parameters.topics"))

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON-able dict: only set fields, sorted collections, ISO dates."""
        out: dict[str, Any] = {}
        if self.moratorium_until is not None:
            out["moratorium_until"] = self.moratorium_until.isoformat()
        if self.time_limit_months is not None:
            out["time_limit_months"] = self.time_limit_months
        if self.granted_on is not None:
            out["granted_on"] = self.granted_on.isoformat()
        for name in ("regions", "users", "projects", "institutions", "topics"):
            values = getattr(self, name)
            if values:
                out[name] = sorted(values)
        if self.collaborator is not None:
            out["collaborator"] = self.collaborator
        return out

    @classmethod
    def from_json(cls, obj: object, *, path: str = "consent.parameters") -> ConsentParameters:
        """Parse the ``parameters`` object of the CLI contract; unknown keys are ignored.

        :raises ConsentInputError: a value of the wrong type (message names ``path.key``).
        """
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise ConsentInputError(f"{path}: expected an object, got {type(obj).__name__}")
        try:
            return cls(
                moratorium_until=_parse_date(obj.get("moratorium_until"), f"{path}.moratorium_until"),
                time_limit_months=obj.get("time_limit_months"),
                granted_on=_parse_date(obj.get("granted_on"), f"{path}.granted_on"),
                regions=_list_or_empty(obj.get("regions"), f"{path}.regions"),
                users=_list_or_empty(obj.get("users"), f"{path}.users"),
                projects=_list_or_empty(obj.get("projects"), f"{path}.projects"),
                institutions=_list_or_empty(obj.get("institutions"), f"{path}.institutions"),
                collaborator=obj.get("collaborator"),
                topics=_list_or_empty(obj.get("topics"), f"{path}.topics"),
            )
        except ConsentInputError as err:
            raise ConsentInputError(_reprefix(str(err), "parameters.", f"{path}.")) from err


def _reprefix(message: str, old: str, new: str) -> str:
    return new + message[len(old) :] if message.startswith(old) else message


def _parse_date(value: object, name: str) -> date | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConsentInputError(f"{name}: expected an ISO 8601 date string, got {type(value).__name__}")
    try:
        return date.fromisoformat(value.strip())
    except ValueError as err:
        raise ConsentInputError(f"{name}: invalid ISO 8601 date {value!r}") from err


def _list_or_empty(value: object, name: str) -> Any:  # a list; the dataclass normalises it to a frozenset
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConsentInputError(f"{name}: expected a list, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class ConsentProfile:
    """A normalised DUO consent: one permission, modifiers, DS diseases, parameters (DESIGN.md,
    "The common model": "many patients share one").

    Codes may be given as CURIEs or OBO IRIs; they are normalised syntactically (validity is the
    evaluator's job, so an unknown code still makes a profile — one that always denies).
    Hashable; :meth:`key` is a stable SHA-256 of :meth:`to_json`'s canonical JSON.
    """

    permission: str
    modifiers: frozenset[str] = frozenset()
    diseases: frozenset[str] = frozenset()
    parameters: ConsentParameters = ConsentParameters()

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "permission", normalize_curie(self.permission))
        except TermError as err:
            raise ConsentInputError(f"permission: {err}") from err
        object.__setattr__(self, "modifiers", _terms(self.modifiers, "modifiers"))
        object.__setattr__(self, "diseases", _terms(self.diseases, "diseases"))
        if not isinstance(self.parameters, ConsentParameters):
            raise ConsentInputError("parameters: expected ConsentParameters")

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON-able dict in the CLI contract's ``consent`` shape."""
        return {
            "permission": self.permission,
            "modifiers": sorted(self.modifiers),
            "diseases": sorted(self.diseases),
            "parameters": self.parameters.to_json(),
        }

    def key(self) -> str:
        """Stable 64-hex-digit SHA-256 of the canonical JSON; equal profiles have equal keys."""
        return _sha256(self.to_json())

    @classmethod
    def from_json(cls, obj: object, *, path: str = "consent") -> ConsentProfile:
        """Parse the CLI contract's ``consent`` object (unknown keys ignored).

        :raises ConsentInputError: missing ``permission`` or a value of the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise ConsentInputError(f"{path}: expected an object, got {type(obj).__name__}")
        if "permission" not in obj:
            raise ConsentInputError(f"{path}.permission: required")
        permission = obj["permission"]
        if not isinstance(permission, str):
            raise ConsentInputError(f"{path}.permission: expected a string, got {type(permission).__name__}")
        parameters = ConsentParameters.from_json(obj.get("parameters"), path=f"{path}.parameters")
        try:
            return cls(
                permission=permission,
                modifiers=_list_or_empty(obj.get("modifiers"), f"{path}.modifiers"),
                diseases=_list_or_empty(obj.get("diseases"), f"{path}.diseases"),
                parameters=parameters,
            )
        except ConsentInputError as err:
            message = str(err)
            raise ConsentInputError(message if message.startswith(path) else f"{path}.{message}") from err


@dataclass(frozen=True, slots=True)
class ResearchPurpose:
    """What the requester wants to do (DESIGN.md step 2; DUO.md "Research Purpose to Query").

    ``codes``: DUO research-purpose terms DUO:0000031..40, or permission-level terms used as
    requests (NRES 4, GRU 42, HMB 6, DS 7, POA 11), or clinical care (DUO:0000043, or the marker
    ``"clinical-care"``, normalised to DUO:0000043).  ``diseases``: MONDO (or other) classes the
    study is about, expressed at the most specific level.  ``topics``: for RS (DUO:0000012).
    """

    codes: frozenset[str]
    diseases: frozenset[str] = frozenset()
    topics: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        codes = _terms(self.codes, "codes")
        codes = frozenset(CLINICAL_CARE if c.lower() in CLINICAL_CARE_MARKERS else c for c in codes)
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "diseases", _terms(self.diseases, "diseases"))
        object.__setattr__(self, "topics", _terms(self.topics, "topics"))

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON-able dict in the CLI contract's ``purpose`` shape."""
        out: dict[str, Any] = {"codes": sorted(self.codes), "diseases": sorted(self.diseases)}
        if self.topics:
            out["topics"] = sorted(self.topics)
        return out

    def key(self) -> str:
        """Stable SHA-256 of the canonical JSON."""
        return _sha256(self.to_json())

    @classmethod
    def from_json(cls, obj: object, *, path: str = "purpose") -> ResearchPurpose:
        """Parse the CLI contract's ``purpose`` object (unknown keys ignored).

        :raises ConsentInputError: a value of the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise ConsentInputError(f"{path}: expected an object, got {type(obj).__name__}")
        try:
            return cls(
                codes=_list_or_empty(obj.get("codes"), f"{path}.codes"),
                diseases=_list_or_empty(obj.get("diseases"), f"{path}.diseases"),
                topics=_list_or_empty(obj.get("topics"), f"{path}.topics"),
            )
        except ConsentInputError as err:
            message = str(err)
            raise ConsentInputError(message if message.startswith(path) else f"{path}.{message}") from err


_REQUESTER_FLAGS = (
    "not_for_profit",
    "commercial_purpose",
    "irb_approved",
    "collaboration_agreed",
    "publication_agreed",
    "return_agreed",
)
_REQUESTER_TEXT = ("location", "institution", "project", "user")


@dataclass(frozen=True, slots=True)
class Requester:
    """Attested requester attributes (DESIGN.md step 1: authentication produces them, decides nothing).

    Every field is optional: ``None`` means *not attested*, which never satisfies a modifier.
    ``location`` is an ISO 3166-1 alpha-2 country code (upper-cased).  ``publication_not_before``
    is the date the requester agrees not to publish before (MOR, DUO:0000024).
    """

    not_for_profit: bool | None = None
    commercial_purpose: bool | None = None
    irb_approved: bool | None = None
    collaboration_agreed: bool | None = None
    publication_agreed: bool | None = None
    return_agreed: bool | None = None
    location: str | None = None
    institution: str | None = None
    project: str | None = None
    user: str | None = None
    publication_not_before: date | None = None

    def __post_init__(self) -> None:
        for name in _REQUESTER_FLAGS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConsentInputError(f"{name}: expected true, false or null, got {value!r}")
        for name in _REQUESTER_TEXT:
            object.__setattr__(self, name, _opt_text(getattr(self, name), name, upper=name == "location"))
        object.__setattr__(
            self, "publication_not_before", _as_date(self.publication_not_before, "publication_not_before")
        )

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON-able dict (attested fields only)."""
        out: dict[str, Any] = {}
        for name in _REQUESTER_FLAGS + _REQUESTER_TEXT:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.publication_not_before is not None:
            out["publication_not_before"] = self.publication_not_before.isoformat()
        return out

    def key(self) -> str:
        """Stable SHA-256 of the canonical JSON."""
        return _sha256(self.to_json())

    @classmethod
    def from_json(cls, obj: object, *, path: str = "requester") -> Requester:
        """Parse the CLI contract's ``requester`` object.  Unknown fields are ignored; missing or
        ``null`` fields are not attested.

        :raises ConsentInputError: a known field of the wrong type.
        """
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise ConsentInputError(f"{path}: expected an object, got {type(obj).__name__}")
        kwargs: dict[str, Any] = {name: obj.get(name) for name in _REQUESTER_FLAGS + _REQUESTER_TEXT}
        kwargs["publication_not_before"] = _parse_date(
            obj.get("publication_not_before"), f"{path}.publication_not_before"
        )
        try:
            return cls(**kwargs)
        except ConsentInputError as err:
            raise ConsentInputError(f"{path}.{err}") from err


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer: ``permit``, ``deny`` or ``indeterminate``, with human-readable reasons."""

    decision: DecisionValue
    reasons: tuple[str, ...] = ()

    @property
    def permitted(self) -> bool:
        """True only for ``permit`` (indeterminate is *not* access)."""
        return self.decision == PERMIT

    def to_json(self) -> dict[str, Any]:
        """``{"decision": ..., "reasons": [...]}`` — the CLI's output object."""
        return {"decision": self.decision, "reasons": list(self.reasons)}


# ---------------------------------------------------------------------------------------------
# Purpose classification ("walk up from the request")
# ---------------------------------------------------------------------------------------------


class PurposeKind(enum.Enum):
    """What a purpose code asks for, i.e. the least permission that allows it (DUO.md)."""

    NON_RESEARCH = "non-research use"  # NRES as a request: only NRES allows it
    CLINICAL = "clinical care"  # NRES, or any permission + CC
    GENERAL = "general research"  # GRU-level, non-health
    BIOMEDICAL = "health/medical/biomedical research"  # HMB-level
    DISEASE = "disease-specific research"  # DS-level (HMB-level when no disease is named)
    ANCESTRY = "population origins/ancestry research"  # POA-level
    METHODS = "methods development"  # allowed by every research permission absent NMDS


#: Anchors of the purpose classification.  A code's kind is the kind of its most specific
#: ancestor-or-self in this table, using the DUO closure (DUO.md: "the request is always
#: expressed at its most specific level ... walk *up* from the request").  Investigation terms
#: 38/39 get BIOMEDICAL through DUO:0000037.  34/35/36 (age, gender, control) are not under
#: DUO:0000037 in DUO, so they are GENERAL: only GRU/NRES permit them.  32 (population research)
#: is ANCESTRY (DUO.md lists 33/32 for POA; NPOA's definition names "population").
_PURPOSE_ANCHORS: Final[Mapping[str, PurposeKind]] = MappingProxyType(
    {
        NRES: PurposeKind.NON_RESEARCH,
        CC: PurposeKind.CLINICAL,
        GRU: PurposeKind.GENERAL,
        HMB: PurposeKind.BIOMEDICAL,
        DS: PurposeKind.DISEASE,
        POA: PurposeKind.ANCESTRY,
        "DUO:0000031": PurposeKind.METHODS,
        "DUO:0000032": PurposeKind.ANCESTRY,
        "DUO:0000033": PurposeKind.ANCESTRY,
        "DUO:0000034": PurposeKind.GENERAL,
        "DUO:0000035": PurposeKind.GENERAL,
        "DUO:0000036": PurposeKind.GENERAL,
        "DUO:0000037": PurposeKind.BIOMEDICAL,
        "DUO:0000040": PurposeKind.DISEASE,
    }
)

_RESEARCH_KINDS = frozenset(
    {
        PurposeKind.GENERAL,
        PurposeKind.BIOMEDICAL,
        PurposeKind.DISEASE,
        PurposeKind.ANCESTRY,
        PurposeKind.METHODS,
    }
)

#: DUO.md, "Permission (one per dataset) against the research purpose": which kinds each
#: permission allows outright.  DS's BIOMEDICAL/DISEASE additionally need the disease check;
#: CLINICAL is decided by NRES or the CC modifier.
_PERMITTED_KINDS: Final[Mapping[str, frozenset[PurposeKind]]] = MappingProxyType(
    {
        NRES: frozenset(PurposeKind),
        GRU: _RESEARCH_KINDS,
        HMB: frozenset({PurposeKind.BIOMEDICAL, PurposeKind.DISEASE, PurposeKind.METHODS}),
        DS: frozenset({PurposeKind.BIOMEDICAL, PurposeKind.DISEASE, PurposeKind.METHODS}),
        POA: frozenset({PurposeKind.ANCESTRY, PurposeKind.METHODS}),
    }
)

_PERMISSION_SCOPE: Final[Mapping[str, str]] = MappingProxyType(
    {
        NRES: "any use",
        GRU: "research use only",
        HMB: "health/medical/biomedical research only "
        "(not population origins/ancestry, not general non-health research)",
        DS: "research on its diseases only",
        POA: "population origins/ancestry research only",
    }
)


def purpose_kind(code: str, ontology: DuoOntology) -> PurposeKind | None:
    """Classify a resolved purpose code by its most specific anchor ancestor-or-self, or ``None``
    when it is not a purpose term (e.g. a modifier other than CC, or the OBI root)."""
    candidates = [c for c in ({code} | ontology.ancestors(code)) if c in _PURPOSE_ANCHORS]
    if not candidates:
        return None
    most_specific = max(candidates, key=lambda c: (len(ontology.ancestors(c)), c))
    return _PURPOSE_ANCHORS[most_specific]


def add_months(start: date, months: int) -> date:
    """Calendar month arithmetic, clamping the day (2025-01-31 + 1 month = 2025-02-28)."""
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    return date(year, month, min(start.day, calendar.monthrange(year, month)[1]))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Finding:
    verdict: DecisionValue
    reason: str


@dataclass(frozen=True, slots=True)
class _Context:
    profile: ConsentProfile
    purpose: ResearchPurpose
    requester: Requester
    ontology: DuoOntology
    diseases: DiseaseHierarchy
    today: date
    permission: str | None  # resolved, valid permission (None if invalid)
    modifiers: frozenset[str]  # resolved, valid modifiers
    kinds: Mapping[str, PurposeKind] = field(default_factory=dict)  # resolved valid purpose codes

    def t(self, code: str) -> str:
        return self.ontology.display(code)


def _resolve_code(
    raw: str,
    ontology: DuoOntology,
    role: str,
    valid: frozenset[str],
    expectation: str,
) -> tuple[str | None, _Finding | None]:
    code = ontology.resolve(raw)
    if code is None:
        return None, _Finding(
            DENY, f"{role} {raw} is not a term of DUO {_release(ontology)}; unknown codes fail closed"
        )
    if ontology.is_obsolete(code):
        return None, _Finding(DENY, f"{role} {ontology.display(code)} is obsolete in DUO; obsolete codes fail closed")
    if code not in valid:
        return None, _Finding(DENY, f"{role} {ontology.display(code)} is not {expectation}")
    return code, None


def _release(ontology: DuoOntology) -> str:
    version = ontology.version_iri or ""
    match = re.search(r"releases/([0-9-]+)/", version)
    return match.group(1) if match else (version or "(unversioned)")


def _disease_match(ctx: _Context, disease: str) -> tuple[str | None, bool]:
    """(matching consent disease or None, whether the disease is known to the hierarchy)."""
    ancestors = ctx.diseases.ancestors(disease)
    if ancestors is None:
        return None, False
    for allowed in sorted(ctx.profile.diseases):
        if disease == allowed or allowed in ancestors:
            return allowed, True
    return None, True


def _check_permission(ctx: _Context) -> list[_Finding]:
    """DUO.md, "Permission (one per dataset) against the research purpose"."""
    perm = ctx.permission
    if perm is None or not ctx.kinds:
        return []
    findings: list[_Finding] = []
    allowed = _PERMITTED_KINDS[perm]
    for code, kind in sorted(ctx.kinds.items()):
        if kind is PurposeKind.CLINICAL:
            if perm == NRES:
                findings.append(_Finding(PERMIT, f"{ctx.t(NRES)} permits any use, including clinical care"))
            elif CC in ctx.modifiers:
                findings.append(_Finding(PERMIT, f"{ctx.t(CC)} permits clinical care use in addition to {ctx.t(perm)}"))
            else:
                findings.append(
                    _Finding(
                        DENY,
                        f"clinical care use ({ctx.t(code)} as purpose) requires {ctx.t(NRES)} or the {ctx.t(CC)} "
                        f"modifier; the consent has {ctx.t(perm)} without CC",
                    )
                )
        elif kind in allowed:
            if perm == DS and kind in (PurposeKind.BIOMEDICAL, PurposeKind.DISEASE) and not ctx.purpose.diseases:
                findings.append(
                    _Finding(
                        DENY,
                        f"{ctx.t(DS)} permits research on {', '.join(sorted(ctx.profile.diseases)) or 'its diseases'} "
                        f"only; the request {ctx.t(code)} names no disease",
                    )
                )
            else:
                findings.append(_Finding(PERMIT, f"{ctx.t(perm)} permits {ctx.t(code)} as {kind.value}"))
        else:
            findings.append(
                _Finding(
                    DENY,
                    f"{ctx.t(perm)} permits {_PERMISSION_SCOPE[perm]}; {ctx.t(code)} is {kind.value}",
                )
            )
    research = any(kind in _RESEARCH_KINDS for kind in ctx.kinds.values())
    if perm == DS and research and ctx.purpose.diseases:
        findings.extend(_check_ds_diseases(ctx))
    if perm == POA and ctx.purpose.diseases:
        findings.append(
            _Finding(
                DENY,
                f"{ctx.t(POA)} denies disease-specific requests; the request names "
                f"{', '.join(sorted(ctx.purpose.diseases))}",
            )
        )
    return findings


def _check_ds_diseases(ctx: _Context) -> list[_Finding]:
    """DUO.md, "DS DUO:0000007": each requested disease must be ≡ or a subclass of a consent disease."""
    findings: list[_Finding] = []
    targets = ", ".join(sorted(ctx.profile.diseases))
    under = f"under {targets}" if len(ctx.profile.diseases) == 1 else f"under one of {targets}"
    for disease in sorted(ctx.purpose.diseases):
        match, known = _disease_match(ctx, disease)
        if not known:
            findings.append(
                _Finding(
                    DENY,
                    f"{ctx.t(DS)} requires every requested disease to fall {under}; {disease} is not known to the "
                    f"configured disease hierarchy (unknown disease codes fail closed)",
                )
            )
        elif match is None:
            findings.append(
                _Finding(
                    DENY,
                    f"{ctx.t(DS)} requires every requested disease to fall {under}; {disease} does not",
                )
            )
        elif match == disease:
            findings.append(_Finding(PERMIT, f"{ctx.t(DS)} permits {disease}: it is a consented disease"))
        else:
            findings.append(_Finding(PERMIT, f"{ctx.t(DS)} permits {disease}: it falls under {match}"))
    return findings


def _attested(
    ctx: _Context,
    modifier: str,
    value: bool | None,
    wanted: bool,
    what: str,
    attribute: str,
) -> _Finding:
    if value is None:
        return _Finding(INDETERMINATE, f"{ctx.t(modifier)} requires {what}; the requester has not attested {attribute}")
    if value is not wanted:
        return _Finding(
            DENY, f"{ctx.t(modifier)} requires {what}; the requester attests {attribute} = {str(value).lower()}"
        )
    return _Finding(PERMIT, f"{ctx.t(modifier)}: {what} attested")


def _npu(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: NPU 45 — the requester organisation must be not-for-profit."""
    return [
        _attested(
            ctx,
            modifier,
            ctx.requester.not_for_profit,
            True,
            "a not-for-profit requester organisation",
            "not_for_profit",
        )
    ]


def _ncu(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: NCU 46 — the purpose must be non-commercial (for-profit orgs may do non-commercial research)."""
    return [
        _attested(
            ctx, modifier, ctx.requester.commercial_purpose, False, "a non-commercial purpose", "commercial_purpose"
        )
    ]


def _npuncu(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md quirk (2): NPUNCU 18 is NPU ∧ NCU, not a superclass to match by subsumption."""
    return _npu(ctx, modifier) + _ncu(ctx, modifier)


def _irb(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: IRB 21 — ethics approval required."""
    return [_attested(ctx, modifier, ctx.requester.irb_approved, True, "ethics (IRB/ERB) approval", "irb_approved")]


def _col(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: COL 20 — collaboration agreed with the named PI."""
    who = ctx.profile.parameters.collaborator
    what = f"collaboration with {who}" if who else "collaboration with the primary investigator(s)"
    return [_attested(ctx, modifier, ctx.requester.collaboration_agreed, True, what, "collaboration_agreed")]


def _pub(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: PUB 19 — agrees to publish."""
    return [
        _attested(
            ctx, modifier, ctx.requester.publication_agreed, True, "agreement to publish results", "publication_agreed"
        )
    ]


def _rtn(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: RTN 29 — agrees to return derived data."""
    return [
        _attested(
            ctx,
            modifier,
            ctx.requester.return_agreed,
            True,
            "agreement to return derived/enriched data",
            "return_agreed",
        )
    ]


def _mor(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: MOR 24 — must not publish before the date (REMS: accepted date on or after it).

    Once ``today`` has reached the moratorium date the condition holds for any publication date.
    """
    until = ctx.profile.parameters.moratorium_until
    if until is None:
        return [_Finding(DENY, f"{ctx.t(modifier)} needs parameters.moratorium_until; the consent has none")]
    if ctx.today >= until:
        return [_Finding(PERMIT, f"{ctx.t(modifier)}: the publication moratorium ended on {until.isoformat()}")]
    accepted = ctx.requester.publication_not_before
    if accepted is None:
        return [
            _Finding(
                INDETERMINATE,
                f"{ctx.t(modifier)} forbids publication before {until.isoformat()}; the requester has not attested "
                f"publication_not_before",
            )
        ]
    if accepted < until:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)} forbids publication before {until.isoformat()}; the requester's "
                f"publication_not_before {accepted.isoformat()} is earlier",
            )
        ]
    return [_Finding(PERMIT, f"{ctx.t(modifier)}: requester will not publish before {accepted.isoformat()}")]


def _ts(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: TS 25 — months since approval; deny after expiry.

    Use is allowed on ``granted_on <= today < granted_on + time_limit_months`` (calendar months).
    """
    params = ctx.profile.parameters
    if params.time_limit_months is None or params.granted_on is None:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)} needs parameters.time_limit_months and parameters.granted_on; the consent lacks "
                f"{'time_limit_months' if params.time_limit_months is None else 'granted_on'}",
            )
        ]
    expiry = add_months(params.granted_on, params.time_limit_months)
    if ctx.today < params.granted_on:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)}: use starts on {params.granted_on.isoformat()}; today is {ctx.today.isoformat()}",
            )
        ]
    if ctx.today >= expiry:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)}: the {params.time_limit_months}-month limit from "
                f"{params.granted_on.isoformat()} expired on {expiry.isoformat()}",
            )
        ]
    return [
        _Finding(
            PERMIT, f"{ctx.t(modifier)}: within the {params.time_limit_months}-month limit (until {expiry.isoformat()})"
        )
    ]


def _gs(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: GS 22 — the requester's location must lie within the region (ISO 3166-1 alpha-2 or
    a :data:`REGION_GROUPS` name)."""
    regions = ctx.profile.parameters.regions
    if not regions:
        return [_Finding(DENY, f"{ctx.t(modifier)} needs parameters.regions; the consent has none")]
    unknown = sorted(r for r in regions if r not in REGION_GROUPS and not _COUNTRY.match(r))
    if unknown:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)}: region(s) {', '.join(unknown)} are neither ISO 3166-1 "
                f"alpha-2 codes nor known region groups ({', '.join(sorted(REGION_GROUPS))}); "
                f"unknown codes fail closed",
            )
        ]
    allowed: set[str] = set()
    for region in regions:
        allowed |= REGION_GROUPS.get(region, {region})
    where = ", ".join(sorted(regions))
    location = ctx.requester.location
    if location is None:
        return [
            _Finding(
                INDETERMINATE, f"{ctx.t(modifier)} limits use to {where}; the requester has not attested a location"
            )
        ]
    if not _COUNTRY.match(location):
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)} limits use to {where}; requester location {location!r} is not "
                f"an ISO 3166-1 alpha-2 country code",
            )
        ]
    if location not in allowed:
        return [_Finding(DENY, f"{ctx.t(modifier)} limits use to {where}; the requester is in {location}")]
    return [_Finding(PERMIT, f"{ctx.t(modifier)}: requester location {location} is within {where}")]


def _allow_list(attribute: str, parameter: str) -> Callable[[_Context, str], list[_Finding]]:
    def check(ctx: _Context, modifier: str) -> list[_Finding]:
        allowed: frozenset[str] = getattr(ctx.profile.parameters, parameter)
        if not allowed:
            return [_Finding(DENY, f"{ctx.t(modifier)} needs parameters.{parameter}; the consent lists none")]
        value: str | None = getattr(ctx.requester, attribute)
        if value is None:
            return [
                _Finding(
                    INDETERMINATE,
                    f"{ctx.t(modifier)} limits use to approved {parameter}; the requester "
                    f"has not attested a {attribute}",
                )
            ]
        if value not in allowed:
            return [
                _Finding(
                    DENY,
                    f"{ctx.t(modifier)} limits use to approved {parameter}; {attribute} {value!r} is not on the list",
                )
            ]
        return [_Finding(PERMIT, f"{ctx.t(modifier)}: {attribute} {value!r} is approved")]

    check.__doc__ = f"DUO.md: allow-list check of requester.{attribute} against parameters.{parameter}."
    return check


def _gso(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: GSO 16 — only genetic studies (DUO:0000038); phenotype-only studies are denied."""
    genetic = [c for c in ctx.kinds if ctx.ontology.is_a(c, GENETIC_RESEARCH)]
    if genetic:
        return [_Finding(PERMIT, f"{ctx.t(modifier)}: the purpose includes {ctx.t(genetic[0])}")]
    return [
        _Finding(
            DENY,
            f"{ctx.t(modifier)} limits use to genetic studies; the purpose does not include {ctx.t(GENETIC_RESEARCH)}",
        )
    ]


def _nmds(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: NMDS 15 — methods development is denied unless the study also stays inside the
    permission: it must come with a non-methods research purpose (which the permission check then
    holds to the permission, e.g. DS's disease match — DUOS: "NMDS true AND DS-X match")."""
    methods = sorted(c for c, k in ctx.kinds.items() if k is PurposeKind.METHODS)
    if not methods:
        return [_Finding(PERMIT, f"{ctx.t(modifier)}: no methods development requested")]
    others = sorted(c for c, k in ctx.kinds.items() if k in _RESEARCH_KINDS and k is not PurposeKind.METHODS)
    if not others:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)} denies general methods research: {ctx.t(methods[0])} is "
                f"requested without a research purpose inside the permission",
            )
        ]
    return [_Finding(PERMIT, f"{ctx.t(modifier)}: methods development is tied to {ctx.t(others[0])}")]


def _npoa(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: NPOA 44 — population origins/ancestry purposes are denied."""
    banned = sorted(c for c, k in ctx.kinds.items() if k is PurposeKind.ANCESTRY)
    if banned:
        return [
            _Finding(
                DENY,
                f"{ctx.t(modifier)} prohibits population origins/ancestry research; the purpose "
                f"includes {ctx.t(banned[0])}",
            )
        ]
    return [_Finding(PERMIT, f"{ctx.t(modifier)}: no population origins/ancestry research requested")]


def _rs(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: RS 12 + topic — the purpose must fall within the topic.  A purpose topic matches
    when it equals a consent topic or has it among its ancestors in the supplied hierarchy."""
    topics = ctx.profile.parameters.topics
    if not topics:
        return [_Finding(DENY, f"{ctx.t(modifier)} needs parameters.topics; the consent has none")]
    where = ", ".join(sorted(topics))
    if not ctx.purpose.topics:
        return [_Finding(INDETERMINATE, f"{ctx.t(modifier)} limits use to {where}; the purpose declares no topics")]
    findings = []
    for topic in sorted(ctx.purpose.topics):
        ancestors = ctx.diseases.ancestors(topic) or frozenset()
        if topic in topics or topics & ancestors:
            findings.append(_Finding(PERMIT, f"{ctx.t(modifier)}: topic {topic} is within {where}"))
        else:
            findings.append(_Finding(DENY, f"{ctx.t(modifier)} limits use to {where}; topic {topic} is not within it"))
    return findings


def _cc(ctx: _Context, modifier: str) -> list[_Finding]:
    """DUO.md: CC 43 — clinical care is permitted in addition to the permission; restricts nothing."""
    return [_Finding(PERMIT, f"{ctx.t(modifier)} adds clinical care use and restricts nothing")]


#: One rule per modifier (DUO.md, "Modifiers").  A modifier DUO knows but this table lacks fails
#: closed; a test holds the table and the vendored release in step.
_MODIFIER_RULES: Final[Mapping[str, Callable[[_Context, str], list[_Finding]]]] = MappingProxyType(
    {
        NPU: _npu,
        NCU: _ncu,
        NPUNCU: _npuncu,
        IRB: _irb,
        COL: _col,
        PUB: _pub,
        RTN: _rtn,
        MOR: _mor,
        TS: _ts,
        GS: _gs,
        US: _allow_list("user", "users"),
        PS: _allow_list("project", "projects"),
        IS: _allow_list("institution", "institutions"),
        GSO: _gso,
        NMDS: _nmds,
        NPOA: _npoa,
        RS: _rs,
        CC: _cc,
    }
)

#: Codes that have a rule here (exported for tests / docs).
PERMISSION_CODES: Final = frozenset(_PERMITTED_KINDS)
MODIFIER_CODES: Final = frozenset(_MODIFIER_RULES)
PURPOSE_ANCHOR_CODES: Final = frozenset(_PURPOSE_ANCHORS)


def evaluate(
    profile: ConsentProfile,
    purpose: ResearchPurpose,
    requester: Requester,
    ontology: DuoOntology,
    diseases: DiseaseHierarchy,
    today: date,
) -> Decision:
    """Decide whether ``requester`` may use data under ``profile`` for ``purpose`` (DUO.md,
    "Matching semantics a data-access gateway must implement").

    Pure: the result depends only on the arguments.  AND over the permission and all modifiers;
    deny > indeterminate > permit; unknown / obsolete / misplaced codes deny.  ``reasons`` lists,
    for deny, every failed condition followed by every undecidable one; for indeterminate, the
    undecidable ones; for permit, why each condition holds.
    """
    if isinstance(today, datetime):
        today = today.date()
    findings: list[_Finding] = []

    permission, problem = _resolve_code(
        profile.permission,
        ontology,
        "consent permission",
        ontology.permissions & PERMISSION_CODES,
        "a data use permission (one of NRES, GRU, HMB, DS, POA)",
    )
    if problem:
        findings.append(problem)

    modifiers: set[str] = set()
    for raw in sorted(profile.modifiers):
        code, problem = _resolve_code(
            raw,
            ontology,
            "consent modifier",
            ontology.modifiers & MODIFIER_CODES,
            "a data use modifier this gateway can evaluate",
        )
        if problem:
            findings.append(problem)
        elif code is not None:
            modifiers.add(code)

    if permission == DS and not profile.diseases:
        findings.append(_Finding(DENY, f"consent {ontology.display(DS)} lists no disease; it can permit nothing"))
        permission = None
    elif permission is not None and permission != DS and profile.diseases:
        findings.append(
            _Finding(
                DENY,
                f"consent lists diseases {', '.join(sorted(profile.diseases))} but its permission "
                f"{ontology.display(permission)} is not DS; the profile is inconsistent",
            )
        )

    kinds: dict[str, PurposeKind] = {}
    if not purpose.codes:
        findings.append(_Finding(DENY, "the purpose names no DUO research-purpose term"))
    for raw in sorted(purpose.codes):
        code = ontology.resolve(raw)
        if code is None:
            findings.append(
                _Finding(
                    DENY, f"purpose code {raw} is not a term of DUO {_release(ontology)}; unknown codes fail closed"
                )
            )
            continue
        if ontology.is_obsolete(code):
            findings.append(
                _Finding(DENY, f"purpose code {ontology.display(code)} is obsolete in DUO; obsolete codes fail closed")
            )
            continue
        kind = purpose_kind(code, ontology)
        if kind is None:
            findings.append(
                _Finding(
                    DENY,
                    f"purpose code {ontology.display(code)} is not a research-purpose term "
                    f"(DUO:0000031-40, a permission used as request, or clinical care)",
                )
            )
            continue
        kinds[code] = kind

    ctx = _Context(
        profile=profile,
        purpose=purpose,
        requester=requester,
        ontology=ontology,
        diseases=diseases,
        today=today,
        permission=permission,
        modifiers=frozenset(modifiers),
        kinds=MappingProxyType(kinds),
    )
    findings.extend(_check_permission(ctx))
    for modifier in sorted(modifiers):
        findings.extend(_MODIFIER_RULES[modifier](ctx, modifier))

    return _combine(findings)


def _combine(findings: Iterable[_Finding]) -> Decision:
    """deny > indeterminate > permit; reasons de-duplicated, in evaluation order."""
    by_verdict: dict[str, list[str]] = {PERMIT: [], DENY: [], INDETERMINATE: []}
    for finding in findings:
        bucket = by_verdict[finding.verdict]
        if finding.reason not in bucket:
            bucket.append(finding.reason)
    if by_verdict[DENY]:
        return Decision(DENY, tuple(by_verdict[DENY] + by_verdict[INDETERMINATE]))
    if by_verdict[INDETERMINATE]:
        return Decision(INDETERMINATE, tuple(by_verdict[INDETERMINATE]))
    if not by_verdict[PERMIT]:  # pragma: no cover - a valid purpose always yields a finding
        return Decision(DENY, ("no condition could be evaluated",))
    return Decision(PERMIT, tuple(by_verdict[PERMIT]))
