"""Common model → OMOP CDM v5.4 rows (+ MI-CDM ``image_occurrence`` / ``image_feature``); pure.

Input: plain dicts of ``cm_*`` rows (and normalised imaging series / SR items); output: per OMOP table
a list of dicts keyed by the DDL's column names, plus a :class:`~mappings.vocab.Coverage` report and
the CONCEPT / VOCABULARY / DOMAIN / CONCEPT_CLASS rows every referenced concept needs (the official
constraints make every ``*_concept_id`` a foreign key into CONCEPT).

Conventions (OMOP CDM v5.4 "Data Model Conventions"):

* ids are integers assigned here, stable within one export (persons ordered by patient id, events
  by their common-model key); ``person_source_value`` keeps the site's patient id and every event's
  ``*_source_value`` its code, so an import can recover both;
* rows without the date the CDM requires (or whose person has no year of birth) are skipped and
  counted in the coverage report (``skipped``);
* type concepts: 32817 "EHR" for every record (the data came from the site's EHR / PACS);
* observations route by the domain of their standard concept; an unmapped code goes to
  ``measurement`` when it has a numeric value or a vital-signs / laboratory category, otherwise to
  ``observation``;
* ``observation_period``: one per person, from the earliest to the latest event date;
* imaging (MI-CDM): one ``image_occurrence`` per series, each pointing at one imaging
  ``procedure_occurrence`` per study (MI-CDM requires the procedure; its concept is the modality's
  procedure when known, else 0 with ``procedure_source_value`` = ``DICOM:<modalities>``);
  ``image_feature`` rows for numeric SR measurements, each linked to the ``measurement`` row that
  holds the value (``image_feature_event_id`` = measurement_id).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from mappings.omop.ddl import tables as ddl_tables
from mappings.vocab import NO_MATCH, Concept, Coverage, Mapped, Vocabulary

EHR = 32817
#: OMOP's range for site-local concepts ("2-billionaires"): concept ids above 2,000,000,000.
LOCAL_CONCEPT_BASE = 2_000_000_000
LOCAL_CONCEPT_SPAN = 2**31 - 1 - LOCAL_CONCEPT_BASE - 1  # ids stay within a 32-bit integer column
#: image_feature.image_feature_event_field_concept_id for features whose value is a MEASUREMENT row
#: (MI-CDM: the CDM-vocabulary concept of the clinical table/field image_feature_event_id points into;
#: 1147330 = measurement.measurement_id of the CDM vocabulary).
MEASUREMENT_EVENT_FIELD = 1147330
MEASUREMENT_CATEGORIES = frozenset({"vital-signs", "laboratory"})
EPOCH = dt.date(1970, 1, 1)

#: Tables written by an export, in load order (vocabulary first).
CLINICAL_TABLES = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "procedure_occurrence",
    "measurement",
    "observation",
    "death",
    "image_occurrence",
    "image_feature",
)
VOCAB_TABLES = ("concept", "vocabulary", "domain", "concept_class")


def to_date(value: str | None) -> dt.date | None:
    """The calendar date of an ISO date/dateTime (partial dates: first day); None if unparsable."""
    if not value or not isinstance(value, str):
        return None
    v = value.strip()
    try:
        if len(v) >= 10 and v[4] == "-":
            return dt.date(int(v[:4]), int(v[5:7]), int(v[8:10]))
        if len(v) == 8 and v.isdigit():  # DICOM DA
            return dt.date(int(v[:4]), int(v[4:6]), int(v[6:8]))
        if len(v) == 7 and v[4] == "-":
            return dt.date(int(v[:4]), int(v[5:7]), 1)
        if len(v) == 4 and v.isdigit():
            return dt.date(int(v), 1, 1)
    except ValueError:
        return None
    return None


def to_datetime(value: str | None) -> dt.datetime | None:
    """A naive UTC datetime for an ISO dateTime with a time part; None for dates and bad values."""
    if not value or not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def _res_id(value: str | None) -> str | None:
    """``Encounter/123`` → ``123`` (common-model src_id → logical id)."""
    if not value:
        return None
    return value.rsplit("/", 1)[-1]


@dataclass
class ImagingSeries:
    """One imaging series to export (from ``dcm_series`` or a FHIR ImagingStudy.series)."""

    patient_id: str
    study_uid: str
    series_uid: str
    date: str | None
    modality: str | None
    body_part: str | None = None
    wadors_uri: str | None = None


@dataclass
class SrMeasurement:
    """A numeric SR content item (TID 1500 measurement) to export as measurement + image_feature."""

    patient_id: str
    study_uid: str
    series_uid: str | None
    date: str | None
    concept_scheme: str | None
    concept_code: str | None
    concept_meaning: str | None
    value: float | None
    unit_code: str | None
    finding_scheme: str | None = None
    finding_code: str | None = None
    algorithm: str | None = None


@dataclass
class CmData:
    patients: list[dict[Any, Any]] = field(default_factory=list)
    encounters: list[dict[Any, Any]] = field(default_factory=list)
    conditions: list[dict[Any, Any]] = field(default_factory=list)
    observations: list[dict[Any, Any]] = field(default_factory=list)
    procedures: list[dict[Any, Any]] = field(default_factory=list)
    series: list[ImagingSeries] = field(default_factory=list)
    sr_items: list[SrMeasurement] = field(default_factory=list)


@dataclass
class OmopExport:
    tables: dict[str, list[dict[Any, Any]]]
    coverage: Coverage
    concept_ids: set[int]
    #: site-local concepts (id > 2,000,000,000) of the codes the vocabulary does not know, and the
    #: code system of each of their vocabulary ids
    local_concepts: dict[int, Concept] = field(default_factory=dict)
    local_systems: dict[str, str] = field(default_factory=dict)
    #: person_id → common-model patient id (the key of a de-identified export's offsets and pseudonyms)
    person_patients: dict[int, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {t: len(rows) for t, rows in self.tables.items()}


def local_vocabulary_id(system: str) -> str:
    """The OMOP vocabulary_id (≤ 20 characters) of a code system the vocabulary does not know; the
    system URI itself goes to VOCABULARY.vocabulary_reference, where an import finds it."""
    import hashlib

    return "FG-" + hashlib.sha1(system.encode()).hexdigest()[:12]


def local_concept_id(system: str, code: str, taken: dict[int, tuple[str, str]]) -> int:
    """A stable concept id > 2,000,000,000 for (system, code): a hash, probed past collisions."""
    import hashlib

    h = int.from_bytes(hashlib.sha1(f"{system}|{code}".encode()).digest()[:8], "big")
    cid = LOCAL_CONCEPT_BASE + 1 + h % LOCAL_CONCEPT_SPAN
    while taken.get(cid, (system, code)) != (system, code):
        cid = LOCAL_CONCEPT_BASE + 1 + (cid - LOCAL_CONCEPT_BASE) % LOCAL_CONCEPT_SPAN
    return cid


_DOMAIN_OF_TABLE = {
    "condition_occurrence": "Condition",
    "procedure_occurrence": "Procedure",
    "measurement": "Measurement",
    "observation": "Observation",
    "image_feature": "Measurement",
}


class _Mapper:
    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.coverage = Coverage()
        self.used: set[int] = {0, EHR}
        self.local: dict[int, Concept] = {}
        self.local_systems: dict[str, str] = {}
        self._local_keys: dict[int, tuple[str, str]] = {}

    def code(self, table: str, system: str | None, code: str | None) -> Mapped:
        m = self.vocab.map_system(system, code)
        voc = self.vocab_name(system)
        self.coverage.note(table, voc, code, m.concept_id)
        if m.source_concept_id == 0 and system and code:
            # OMOP's rule for local codes: a non-standard source concept > 2,000,000,000 in a
            # vocabulary of its own, so an import restores system and code exactly
            m = Mapped(m.concept_id, self._local(table, system, code), m.domain)
        self.used.update((m.concept_id, m.source_concept_id))
        return m

    def _local(self, table: str, system: str, code: str) -> int:
        cid = local_concept_id(system, code, self._local_keys)
        domain = _DOMAIN_OF_TABLE.get(table.split(".", 1)[0], "Metadata")
        old = self.local.get(cid)
        if old is None or domain < old.domain:  # the same code in several tables: a stable choice
            self._local_keys[cid] = (system, code)
            voc = local_vocabulary_id(system)
            self.local_systems[voc] = system
            self.local[cid] = Concept(cid, voc, code, code, domain, None, "Undefined")
        return cid

    def dicom(self, table: str, code: str | None) -> Mapped:
        m = self.vocab.map_dicom(code)
        self.coverage.note(table, "DICOM", code, m.concept_id)
        self.used.add(m.concept_id)
        return m

    def source(self, table: str, source_vocab: str, code: str | None) -> Mapped:
        m = self.vocab.map_source(source_vocab, code)
        self.coverage.note(table, source_vocab, code, m.concept_id)
        self.used.add(m.concept_id)
        return m

    def unit(self, table: str, unit: str | None) -> int | None:
        if not unit:
            return None
        return self.code(table + ".unit", "http://unitsofmeasure.org", unit).concept_id

    @staticmethod
    def vocab_name(system: str | None) -> str:
        from mappings.vocab import SYSTEM_TO_VOCAB

        return SYSTEM_TO_VOCAB.get(system or "", system or "(none)")


def person_source_value(p: dict[Any, Any]) -> str | None:
    """The site's patient id; for a patient imported from OMOP, the person_source_value it came with
    (kept as an identifier), so export → import → export writes the same PERSON rows."""
    if p.get("src_type") == "OMOP" and p.get("identifiers"):
        for ident in orjson.loads(p["identifiers"]):
            if isinstance(ident, str) and ident.startswith("urn:omop:person_source_value|"):
                return ident.split("|", 1)[1]
    return p.get("patient_id")


def export_rows(data: CmData, vocab: Vocabulary) -> OmopExport:
    """Map the common-model rows in ``data`` to OMOP CDM v5.4 tables (see the module docstring)."""
    mp = _Mapper(vocab)
    cov = mp.coverage
    out: dict[str, list[dict[Any, Any]]] = {t: [] for t in CLINICAL_TABLES}

    # -- person -----------------------------------------------------------------------------
    person_of: dict[str, int] = {}
    birth: dict[str, dt.date | None] = {}
    for p in sorted(data.patients, key=lambda r: person_source_value(r) or ""):
        pid = p["patient_id"]
        if not pid or pid in person_of:
            continue
        bd = to_date(p.get("birth_date"))
        if bd is None:
            cov.skip("person", "no year of birth")
            continue
        person_id = len(person_of) + 1
        person_of[pid] = person_id
        birth[pid] = bd
        g = mp.source("person.gender", "fhir-gender", p.get("sex"))
        r = mp.source("person.race", "cdc-race", p.get("race"))
        e = mp.source("person.ethnicity", "cdc-ethnicity", p.get("ethnicity"))
        full = p.get("birth_date") or ""
        out["person"].append(
            {
                "person_id": person_id,
                "gender_concept_id": g.concept_id,
                "year_of_birth": bd.year,
                "month_of_birth": bd.month if len(full) >= 7 else None,
                "day_of_birth": bd.day if len(full) >= 10 else None,
                "birth_datetime": None,
                "race_concept_id": r.concept_id,
                "ethnicity_concept_id": e.concept_id,
                "person_source_value": person_source_value(p),
                "gender_source_value": p.get("sex"),
                "gender_source_concept_id": 0,
                "race_source_value": p.get("race"),
                "race_source_concept_id": 0,
                "ethnicity_source_value": p.get("ethnicity"),
                "ethnicity_source_concept_id": 0,
            }
        )
        death = to_date(p.get("deceased_date"))
        if death is not None:
            out["death"].append(
                {
                    "person_id": person_id,
                    "death_date": death,
                    "death_datetime": to_datetime(p.get("deceased_date")),
                    "death_type_concept_id": EHR,
                    "cause_concept_id": None,
                    "cause_source_value": None,
                    "cause_source_concept_id": None,
                }
            )

    span: dict[int, list[dt.date]] = {}

    def seen(person_id: int, *dates: dt.date | None) -> None:
        for d in dates:
            if d is None:
                continue
            s = span.get(person_id)
            if s is None:
                span[person_id] = [d, d]
            elif d < s[0]:
                s[0] = d
            elif d > s[1]:
                s[1] = d

    def person(table: str, row: dict[Any, Any]) -> int | None:
        pid = person_of.get(row.get("patient_id") or "")
        if pid is None:
            cov.skip(table, "no exported person")
        return pid

    # -- visit_occurrence ---------------------------------------------------------------------
    visit_of: dict[str, int] = {}
    for v in sorted(data.encounters, key=lambda r: r["pk"]):
        pid = person("visit_occurrence", v)
        if pid is None:
            continue
        start = to_date(v.get("start"))
        if start is None:
            cov.skip("visit_occurrence", "no start date")
            continue
        end = to_date(v.get("end")) or start
        end = max(end, start)
        vid = len(out["visit_occurrence"]) + 1
        visit_of[_res_id(v["src_id"]) or ""] = vid
        cls = mp.source("visit_occurrence", "v3-ActCode", v.get("class_code"))
        out["visit_occurrence"].append(
            {
                "visit_occurrence_id": vid,
                "person_id": pid,
                "visit_concept_id": cls.concept_id,
                "visit_start_date": start,
                "visit_start_datetime": to_datetime(v.get("start")),
                "visit_end_date": end,
                "visit_end_datetime": to_datetime(v.get("end")),
                "visit_type_concept_id": EHR,
                "provider_id": None,
                "care_site_id": None,
                "visit_source_value": v.get("code") or v.get("class_code"),
                "visit_source_concept_id": 0,
                "admitted_from_concept_id": None,
                "admitted_from_source_value": None,
                "discharged_to_concept_id": None,
                "discharged_to_source_value": None,
                "preceding_visit_occurrence_id": None,
            }
        )
        seen(pid, start, end)

    # -- condition_occurrence -----------------------------------------------------------------
    for c in sorted(data.conditions, key=lambda r: r["pk"]):
        pid = person("condition_occurrence", c)
        if pid is None:
            continue
        start = to_date(c.get("onset"))
        if start is None:
            cov.skip("condition_occurrence", "no onset date")
            continue
        end = to_date(c.get("abatement"))  # type: ignore[assignment]
        m = mp.code("condition_occurrence", c.get("system"), c.get("code"))
        out["condition_occurrence"].append(
            {
                "condition_occurrence_id": len(out["condition_occurrence"]) + 1,
                "person_id": pid,
                "condition_concept_id": m.concept_id,
                "condition_start_date": start,
                "condition_start_datetime": to_datetime(c.get("onset")),
                "condition_end_date": end if end and end >= start else None,
                "condition_end_datetime": None,
                "condition_type_concept_id": EHR,
                "condition_status_concept_id": None,
                "stop_reason": None,
                "provider_id": None,
                "visit_occurrence_id": visit_of.get(c.get("encounter_id") or ""),
                "visit_detail_id": None,
                "condition_source_value": c.get("code"),
                "condition_source_concept_id": m.source_concept_id,
                "condition_status_source_value": c.get("clinical_status"),
            }
        )
        seen(pid, start, end)

    # -- procedure_occurrence ----------------------------------------------------------------
    for p in sorted(data.procedures, key=lambda r: r["pk"]):
        pid = person("procedure_occurrence", p)
        if pid is None:
            continue
        start = to_date(p.get("performed"))
        if start is None:
            cov.skip("procedure_occurrence", "no performed date")
            continue
        end = to_date(p.get("performed_end"))  # type: ignore[assignment]
        m = mp.code("procedure_occurrence", p.get("system"), p.get("code"))
        out["procedure_occurrence"].append(
            _procedure(
                len(out["procedure_occurrence"]) + 1,
                pid,
                m,
                start,
                to_datetime(p.get("performed")),
                end if end and end >= start else None,
                visit_of.get(p.get("encounter_id") or ""),
                p.get("code"),
            )
        )
        seen(pid, start, end)

    # -- measurement / observation ------------------------------------------------------------
    for o in sorted(data.observations, key=lambda r: r["pk"]):
        pid = person("measurement", o)
        if pid is None:
            continue
        date = to_date(o.get("effective"))
        if date is None:
            cov.skip("measurement", "no effective date")
            continue
        m = mp.vocab.map_system(o.get("system"), o.get("code"))
        if o.get("src_type") == "OMOP" and str(o.get("src_id", "")).startswith(("measurement/", "observation/")):
            table = o["src_id"].split("/", 1)[0]  # imported from OMOP: keep the source table
        elif m.domain == "Measurement" or (
            m.domain is None and (o.get("value_num") is not None or o.get("category") in MEASUREMENT_CATEGORIES)
        ):
            table = "measurement"
        else:
            table = "observation"
        m = mp.code(table, o.get("system"), o.get("code"))
        value_concept = None
        if o.get("value_code"):
            vm = mp.code(table + ".value", o.get("value_system"), o.get("value_code"))
            value_concept = vm.concept_id or vm.source_concept_id  # a local code: its local concept
        unit_concept = mp.unit(table, o.get("unit"))
        visit = visit_of.get(o.get("encounter_id") or "")
        value_source = o.get("value_code") or o.get("value_text")
        if table == "measurement":
            out[table].append(
                _measurement(
                    len(out[table]) + 1,
                    pid,
                    m,
                    date,
                    to_datetime(o.get("effective")),
                    o.get("value_num"),
                    value_concept,
                    unit_concept,
                    visit,
                    o.get("code"),
                    o.get("unit"),
                    value_source,
                )
            )
        else:
            out[table].append(
                {
                    "observation_id": len(out[table]) + 1,
                    "person_id": pid,
                    "observation_concept_id": m.concept_id,
                    "observation_date": date,
                    "observation_datetime": to_datetime(o.get("effective")),
                    "observation_type_concept_id": EHR,
                    "value_as_number": o.get("value_num"),
                    "value_as_string": o.get("value_text"),
                    "value_as_concept_id": value_concept,
                    "qualifier_concept_id": None,
                    "unit_concept_id": unit_concept,
                    "provider_id": None,
                    "visit_occurrence_id": visit,
                    "visit_detail_id": None,
                    "observation_source_value": o.get("code"),
                    "observation_source_concept_id": m.source_concept_id,
                    "unit_source_value": o.get("unit"),
                    "qualifier_source_value": None,
                    "value_source_value": value_source,
                    "observation_event_id": None,
                    "obs_event_field_concept_id": None,
                }
            )
        seen(pid, date)

    # -- imaging: procedure per study, image_occurrence per series ----------------------------
    image_of: dict[tuple[str, str], int] = {}
    first_image_of_study: dict[str, int] = {}
    studies: dict[str, list[ImagingSeries]] = {}
    for s in data.series:
        studies.setdefault(s.study_uid, []).append(s)
    for study_uid in sorted(studies):
        series = sorted(studies[study_uid], key=lambda s: s.series_uid)
        pid = person("image_occurrence", series[0].__dict__)
        if pid is None:
            continue
        date = next((d for d in (to_date(s.date) for s in series) if d), None)
        if date is None:
            cov.skip("image_occurrence", "no study date")
            continue
        modalities = sorted({s.modality for s in series if s.modality})
        proc_id = len(out["procedure_occurrence"]) + 1
        out["procedure_occurrence"].append(
            _procedure(proc_id, pid, Mapped(0, 0, None), date, None, None, None, "DICOM:" + "\\".join(modalities))
        )
        cov.note("procedure_occurrence", "DICOM study", "DICOM:" + "\\".join(modalities), 0)
        seen(pid, date)
        for s in series:
            mod = mp.dicom("image_occurrence.modality", s.modality)
            site = mp.dicom("image_occurrence.anatomic_site", s.body_part).concept_id if s.body_part else None
            io_id = len(out["image_occurrence"]) + 1
            image_of[(study_uid, s.series_uid)] = io_id
            first_image_of_study.setdefault(study_uid, io_id)
            out["image_occurrence"].append(
                {
                    "image_occurrence_id": io_id,
                    "person_id": pid,
                    "procedure_occurrence_id": proc_id,
                    "visit_occurrence_id": None,
                    "anatomic_site_concept_id": site or None,
                    "wadors_uri": s.wadors_uri,
                    "local_path": None,
                    "image_occurrence_date": to_date(s.date) or date,
                    "image_study_uid": study_uid,
                    "image_series_uid": s.series_uid,
                    "modality_concept_id": mod.concept_id,
                }
            )

    # -- image_feature: SR measurements ---------------------------------------------------------
    for item in data.sr_items:
        pid = person("image_feature", item.__dict__)
        if pid is None:
            continue
        io_id = image_of.get((item.study_uid, item.series_uid or "")) or first_image_of_study.get(item.study_uid)  # type: ignore[assignment]
        if io_id is None:
            cov.skip("image_feature", "study not exported")
            continue
        date = to_date(item.date) or out["image_occurrence"][io_id - 1]["image_occurrence_date"]
        m = mp.code("image_feature", item.concept_scheme, item.concept_code)
        unit_concept = mp.unit("image_feature", item.unit_code)
        meas_id = len(out["measurement"]) + 1
        out["measurement"].append(
            _measurement(
                meas_id,
                pid,
                m,
                date,
                None,
                item.value,
                None,
                unit_concept,
                None,
                item.concept_code,
                item.unit_code,
                None,
            )
        )
        finding = (
            mp.code("image_feature.finding", item.finding_scheme, item.finding_code).concept_id
            if item.finding_code
            else None
        )
        out["image_feature"].append(
            {
                "image_feature_id": len(out["image_feature"]) + 1,
                "person_id": pid,
                "image_occurrence_id": io_id,
                "image_feature_event_field_concept_id": MEASUREMENT_EVENT_FIELD,
                "image_feature_event_id": meas_id,
                "image_feature_concept_id": m.concept_id,
                "image_feature_type_concept_id": EHR,
                "image_finding_concept_id": finding,
                "image_finding_id": None,
                "anatomic_site_concept_id": None,
                "alg_system": item.algorithm,
                "alg_datetime": None,
            }
        )
        seen(pid, date)

    # -- observation_period -------------------------------------------------------------------
    for pid in sorted(span):
        lo, hi = span[pid]
        out["observation_period"].append(
            {
                "observation_period_id": len(out["observation_period"]) + 1,
                "person_id": pid,
                "observation_period_start_date": lo,
                "observation_period_end_date": hi,
                "period_type_concept_id": EHR,
            }
        )
    for p in out["person"]:
        if p["person_id"] not in span:
            cov.skip("observation_period", "person without dated events")

    used = {c for c in mp.used if c is not None}
    if out["image_feature"]:
        used.add(MEASUREMENT_EVENT_FIELD)
    for r in out["image_occurrence"]:  # type: ignore[assignment]
        used.update(c for c in (r["anatomic_site_concept_id"], r["modality_concept_id"]) if c is not None)  # type: ignore[index]
    return OmopExport(out, cov, used, mp.local, mp.local_systems, {v: k for k, v in person_of.items()})


def _procedure(
    pid_: int,
    person_id: int,
    m: Mapped,
    date: dt.date,
    when: dt.datetime | None,
    end: dt.date | None,
    visit: int | None,
    source: str | None,
) -> dict[Any, Any]:
    return {
        "procedure_occurrence_id": pid_,
        "person_id": person_id,
        "procedure_concept_id": m.concept_id,
        "procedure_date": date,
        "procedure_datetime": when,
        "procedure_end_date": end,
        "procedure_end_datetime": None,
        "procedure_type_concept_id": EHR,
        "modifier_concept_id": None,
        "quantity": None,
        "provider_id": None,
        "visit_occurrence_id": visit,
        "visit_detail_id": None,
        "procedure_source_value": source,
        "procedure_source_concept_id": m.source_concept_id,
        "modifier_source_value": None,
    }


def _measurement(
    mid: int,
    person_id: int,
    m: Mapped,
    date: dt.date,
    when: dt.datetime | None,
    value: Any,
    value_concept: int | None,
    unit_concept: int | None,
    visit: int | None,
    source: str | None,
    unit_source: str | None,
    value_source: str | None,
) -> dict[Any, Any]:
    return {
        "measurement_id": mid,
        "person_id": person_id,
        "measurement_concept_id": m.concept_id,
        "measurement_date": date,
        "measurement_datetime": when,
        "measurement_time": None,
        "measurement_type_concept_id": EHR,
        "operator_concept_id": None,
        "value_as_number": value,
        "value_as_concept_id": value_concept,
        "unit_concept_id": unit_concept,
        "range_low": None,
        "range_high": None,
        "provider_id": None,
        "visit_occurrence_id": visit,
        "visit_detail_id": None,
        "measurement_source_value": source,
        "measurement_source_concept_id": m.source_concept_id,
        "unit_source_value": unit_source,
        "unit_source_concept_id": None,
        "value_source_value": value_source,
        "measurement_event_id": None,
        "meas_event_field_concept_id": None,
    }


def vocabulary_rows(
    vocab: Vocabulary,
    concept_ids: Iterable[int],
    local: dict[int, Concept] | None = None,
    local_systems: dict[str, str] | None = None,
) -> dict[str, list[dict[Any, Any]]]:
    """CONCEPT rows for every referenced concept id (+ the VOCABULARY, DOMAIN and CONCEPT_CLASS rows
    they refer to; their own ``*_concept_id`` is 0, "No matching concept", as the subset does not
    carry those metadata concepts).  ``local``: the export's site-local concepts, whose VOCABULARY
    rows name the code system (vocabulary_name and vocabulary_reference = the system URI)."""
    local = local or {}
    systems = dict(local_systems or {})
    concepts: list[Concept] = []
    for cid in sorted(set(concept_ids) | {0}):
        c = local.get(cid) or vocab.by_id.get(cid)
        if c is None:
            c = NO_MATCH if cid == 0 else Concept(cid, "None", str(cid), f"concept {cid}", "Metadata", None)
        concepts.append(c)
    start, end = dt.date(1970, 1, 1), dt.date(2099, 12, 31)
    rows = {
        "concept": [
            {
                "concept_id": c.concept_id,
                "concept_name": c.name,
                "domain_id": c.domain,
                "vocabulary_id": c.vocabulary,
                "concept_class_id": c.concept_class,
                "standard_concept": c.standard,
                "concept_code": c.code,
                "valid_start_date": start,
                "valid_end_date": end,
                "invalid_reason": None,
            }
            for c in concepts
        ],
        "vocabulary": [
            {
                "vocabulary_id": v,
                "vocabulary_name": systems.get(v, v),
                "vocabulary_reference": systems.get(v),
                "vocabulary_version": "fedgate local codes" if v in systems else vocab.origin,
                "vocabulary_concept_id": 0,
            }
            for v in sorted({c.vocabulary for c in concepts})
        ],
        "domain": [
            {"domain_id": d, "domain_name": d, "domain_concept_id": 0} for d in sorted({c.domain for c in concepts})
        ],
        "concept_class": [
            {"concept_class_id": k, "concept_class_name": k, "concept_class_concept_id": 0}
            for k in sorted({c.concept_class for c in concepts})
        ],
    }
    return rows  # type: ignore[return-value]


def as_tuples(table: str, rows: list[dict[Any, Any]]) -> list[tuple[Any, ...]]:
    """Rows in DDL column order, strings cut to their varchar length (the CDM's limits)."""
    cols = ddl_tables()[table]
    out = []
    for r in rows:
        t = []
        for c in cols:
            v = r.get(c.name)
            if c.max_len is not None and isinstance(v, str) and len(v) > c.max_len:
                v = v[: c.max_len]
            elif v is not None and c.type == "integer" and not isinstance(v, int):
                v = int(v)
            elif v is not None and c.type == "float" and not isinstance(v, float):
                v = float(v)
            t.append(v)
        out.append(tuple(t))
    return out


def cm_json(value: Any) -> str:
    return orjson.dumps(value).decode()
