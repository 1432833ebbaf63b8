"""De-identification of an OMOP CDM export (pure): the same keys, offsets and pseudonyms as FHIR and DICOM.

:func:`deidentify_export` takes the rows of :func:`mappings.omop.export.export_rows` and returns a copy in
which

* every date and datetime column of a person's rows moves by the patient's offset
  (:meth:`ProjectKeys.date_offset_days` of the common-model patient id: the offset the FHIR and DICOM
  de-identifiers use, so a visit, its FHIR Encounter and the study's DICOM StudyDate keep lining up);
* ``person.year_of_birth`` is the year of the shifted birth date (a year-only birth date is kept, as FHIR
  keeps a year-only ``birthDate``), aggregated to "90 or older" as Safe Harbor asks
  (:func:`mappings.deid.dates.safe_harbor_birth_year`); month, day and time of birth are removed;
* ``person_source_value`` is the patient's pseudonym (``pseudonym("Patient", patient id)``: the FHIR
  ``Patient.id`` and DICOM ``PatientID`` of the de-identified exports);
* persons are renumbered in pseudonym order (``person_id`` is a surrogate key; ordered by the site's patient
  ids it would leak their order) and every ``person_id`` follows;
* free text is removed: ``observation.value_as_string``, ``value_source_value`` unless it was a code (the row
  has a ``value_as_concept_id``), ``image_feature.alg_system``, ``stop_reason``, ``cause_source_value``,
  ``local_path``;
* study and series UIDs are the project's UIDs (:meth:`ProjectKeys.uid_for`, those of the de-identified
  DICOM export and WADO), in ``image_occurrence.image_study_uid`` / ``image_series_uid`` and ``wadors_uri``.

Codes (``*_source_value`` of conditions, procedures, measurements, units, gender, race) are not identifiers
and are kept, as are concept ids and the vocabulary rows.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mappings.deid.dates import safe_harbor_birth_year
from mappings.deid.keys import ProjectKeys
from mappings.omop.export import OmopExport

#: Columns holding free text: removed.
FREE_TEXT_COLUMNS = frozenset(
    {"value_as_string", "alg_system", "stop_reason", "cause_source_value", "local_path", "measurement_time"}
)
_BIRTH = ("month_of_birth", "day_of_birth", "birth_datetime")
_WADORS = re.compile(r"^(?P<base>.*?/studies/)(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?$")


def _shift(value: Any, days: int) -> Any:
    if isinstance(value, (dt.date, dt.datetime)):  # a datetime is a date: both move by whole days
        try:
            return value + dt.timedelta(days=days)
        except OverflowError:
            return None
    return value


def _birth(row: dict[str, Any], offset: int, as_of: dt.date) -> int | None:
    year, month, day = row.get("year_of_birth"), row.get("month_of_birth"), row.get("day_of_birth")
    if not isinstance(year, int):
        return None
    try:
        if isinstance(month, int) and isinstance(day, int):
            born = dt.date(year, month, day) + dt.timedelta(days=offset)
        elif isinstance(month, int):
            born = dt.date(year, month, 1) + dt.timedelta(days=offset)
        else:
            born = dt.date(year, 7, 1)  # year precision: kept as it is (as FHIR keeps a year-only birthDate)
    except (ValueError, OverflowError):
        born = dt.date(year, 7, 1)
    return int(safe_harbor_birth_year(born, as_of)[0])


def _wadors(uri: Any, keys: ProjectKeys) -> Any:
    if not isinstance(uri, str):
        return uri
    m = _WADORS.match(uri)
    if m is None:
        return None  # not a study or series URI: its UIDs could not be remapped
    out = m["base"] + keys.uid_for(m["study"])
    if m["series"]:
        out += "/series/" + keys.uid_for(m["series"])
    return out


def deidentify_tables(
    tables: Mapping[str, list[dict[str, Any]]],
    person_patients: Mapping[int, str],
    keys: ProjectKeys,
    *,
    as_of: dt.date | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """De-identified copies of the clinical ``tables`` of an OMOP export (see the module docstring).

    ``person_patients`` maps each ``person_id`` to its common-model patient id (the key of its date offset
    and pseudonym); rows of a person it does not know are dropped."""
    today = as_of or dt.date.today()
    pseudonym = {pid: keys.pseudonym("Patient", key) for pid, key in person_patients.items()}
    offset = {pid: keys.date_offset_days(key) for pid, key in person_patients.items()}
    new_id = {pid: i for i, pid in enumerate(sorted(pseudonym, key=lambda p: pseudonym[p]), start=1)}
    out: dict[str, list[dict[str, Any]]] = {}
    for table, rows in tables.items():
        copied: list[dict[str, Any]] = []
        for row in rows:
            pid = row.get("person_id")
            if not isinstance(pid, int) or pid not in new_id:
                continue
            days = offset[pid]
            new = {k: (None if k in FREE_TEXT_COLUMNS else _shift(v, days)) for k, v in row.items()}
            new["person_id"] = new_id[pid]
            if "value_source_value" in new and new.get("value_as_concept_id") is None:
                new["value_source_value"] = None
            if table == "person":
                new["year_of_birth"] = _birth(row, days, today)
                for k in _BIRTH:
                    new[k] = None
                new["person_source_value"] = pseudonym[pid]
            elif table == "image_occurrence":
                for k in ("image_study_uid", "image_series_uid"):
                    if isinstance(row.get(k), str) and row[k]:
                        new[k] = keys.uid_for(row[k])
                new["wadors_uri"] = _wadors(row.get("wadors_uri"), keys)
            copied.append(new)
        if table == "person":
            copied.sort(key=lambda r: int(r["person_id"]))
        out[table] = copied
    return out


def deidentify_export(result: OmopExport, keys: ProjectKeys, *, as_of: dt.date | None = None) -> OmopExport:
    """The de-identified copy of an OMOP export (its vocabulary and coverage report are kept)."""
    tables = deidentify_tables(result.tables, result.person_patients, keys, as_of=as_of)
    return replace(result, tables=tables, person_patients={})


__all__ = ["FREE_TEXT_COLUMNS", "deidentify_export", "deidentify_tables"]
