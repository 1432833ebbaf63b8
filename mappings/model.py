"""The common model: small, typed, frozen objects every source maps into (see docs/DESIGN.md).

Codes are ``Code(system, code, display)``; OMOP concept ids are a mapping, not the identity.
Dates are ISO-8601 strings as they came from the source (partial dates allowed) so no precision is
invented; helpers in :mod:`mappings.dates` turn them into instants when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Code:
    system: str | None
    code: str
    display: str | None = None

    @property
    def token(self) -> str:
        return f"{self.system or ''}|{self.code}"


@dataclass(frozen=True, slots=True)
class Concept:
    """A coded concept: the primary coding (SNOMED CT / LOINC preferred) and every coding it had."""

    primary: Code | None
    codings: tuple[Code, ...] = ()
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """Where a common-model object came from: (``fhir``, ``Observation/123``), (``dicom``, uid)..."""

    kind: str
    id: str


@dataclass(frozen=True, slots=True)
class Patient:
    source: Source
    patient_id: str
    identifiers: tuple[str, ...] = ()  # "system|value"
    birth_date: str | None = None
    sex: str | None = None  # FHIR administrative gender: male | female | other | unknown
    deceased_date: str | None = None
    race: str | None = None
    ethnicity: str | None = None


@dataclass(frozen=True, slots=True)
class Encounter:
    source: Source
    patient_id: str | None
    class_code: str | None
    concept: Concept
    start: str | None = None
    end: str | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    source: Source
    patient_id: str | None
    concept: Concept
    onset: str | None = None
    abatement: str | None = None
    clinical_status: str | None = None
    encounter_id: str | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """A clinical observation or measurement (FHIR Observation, OMOP measurement, SR numeric item)."""

    source: Source
    patient_id: str | None
    concept: Concept
    category: str | None = None
    value_num: float | None = None
    unit: str | None = None
    value_code: Code | None = None
    value_text: str | None = None
    effective: str | None = None
    status: str | None = None
    encounter_id: str | None = None
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Procedure:
    source: Source
    patient_id: str | None
    concept: Concept
    performed: str | None = None
    performed_end: str | None = None
    status: str | None = None
    encounter_id: str | None = None


@dataclass(frozen=True, slots=True)
class DiagnosticReport:
    source: Source
    patient_id: str | None
    concept: Concept
    effective: str | None = None
    status: str | None = None
    study_refs: tuple[str, ...] = ()
    conclusion: str | None = None


@dataclass(frozen=True, slots=True)
class ImagingStudy:
    source: Source
    patient_id: str | None
    study_uid: str | None
    started: str | None = None
    modalities: tuple[str, ...] = ()
    description: str | None = None
    n_series: int | None = None
    n_instances: int | None = None


@dataclass(frozen=True, slots=True)
class Consent:
    """A patient's consent record as stated by the source; ``profile`` is the normalised DUO
    ConsentProfile (as a JSON-able dict) or None when the record carries no DUO terms."""

    source: Source
    patient_id: str | None
    status: str | None
    period_start: str | None = None
    period_end: str | None = None
    date: str | None = None
    profile: dict[Any, Any] | None = field(default=None, hash=False, compare=False)


ModelObject = Patient | Encounter | Condition | Observation | Procedure | DiagnosticReport | ImagingStudy | Consent
