"""OMOP de-identification: the FHIR de-identifier's offsets and pseudonyms, free text gone, persons renumbered."""

from __future__ import annotations

import datetime as dt

from mappings.deid.fhir import deidentify_resource
from mappings.deid.keys import ProjectKeys
from mappings.deid.omop import deidentify_export
from mappings.omop.export import CmData, ImagingSeries, export_rows
from mappings.vocab import load_vocabulary

KEYS = ProjectKeys("study-a", b"k" * 32)
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.5", "1.2.826.0.1.3680043.8.498.5.1"


def _data() -> CmData:
    return CmData(
        patients=[
            {"pk": 1, "src_type": "fhir", "src_id": "Patient/zz-mrn-1", "patient_id": "zz-mrn-1",
             "birth_date": "1961-04-12", "sex": "male", "race": None, "ethnicity": None,
             "deceased_date": "2023-02-01", "identifiers": None},
            {"pk": 2, "src_type": "fhir", "src_id": "Patient/aa-old", "patient_id": "aa-old",
             "birth_date": "1920-01-05", "sex": "female", "race": None, "ethnicity": None,
             "deceased_date": None, "identifiers": None},
        ],
        encounters=[{"pk": 1, "src_type": "fhir", "src_id": "Encounter/e1", "patient_id": "zz-mrn-1",
                     "class_code": "AMB", "code": None, "start": "2021-06-01T10:00:00+00:00",
                     "end": "2021-06-03T11:00:00+00:00"}],
        observations=[{"pk": 1, "src_type": "fhir", "src_id": "Observation/o1", "patient_id": "zz-mrn-1",
                       "system": "http://loinc.org", "code": "72166-2", "encounter_id": "e1",
                       "category": "social-history",
                       "value_num": None, "unit": None, "value_system": None, "value_code": None,
                       "value_text": "lives with Zebulon at 42 Wallaby Way", "effective": "2021-06-02"}],
        series=[ImagingSeries("zz-mrn-1", STUDY, SERIES, "20210602", "CT", "CHEST",
                              f"/dicomweb/studies/{STUDY}/series/{SERIES}")],
    )


def test_dates_shift_like_fhir_ids_are_pseudonyms_and_free_text_goes():
    result = export_rows(_data(), load_vocabulary())
    out = deidentify_export(result, KEYS, as_of=dt.date(2024, 1, 1))
    t = out.tables
    days = KEYS.date_offset_days("zz-mrn-1")
    person = {p["person_source_value"]: p for p in t["person"]}
    assert set(person) == {KEYS.pseudonym("Patient", "zz-mrn-1"), KEYS.pseudonym("Patient", "aa-old")}
    # persons renumbered in pseudonym order, every person_id follows
    assert [p["person_id"] for p in t["person"]] == [1, 2]
    assert [p["person_source_value"] for p in t["person"]] == sorted(person)
    pid = person[KEYS.pseudonym("Patient", "zz-mrn-1")]["person_id"]
    assert {r["person_id"] for table in ("visit_occurrence", "observation", "image_occurrence", "death")
            for r in t[table]} == {pid}
    # the same shift as the FHIR de-identifier's for the same patient
    enc = deidentify_resource({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/zz-mrn-1"},
                               "period": {"start": "2021-06-01T10:00:00+00:00"}}, KEYS)
    assert enc is not None
    visit = t["visit_occurrence"][0]
    assert visit["visit_start_date"].isoformat() == enc["period"]["start"][:10]
    assert visit["visit_start_datetime"] == dt.datetime(2021, 6, 1, 10) + dt.timedelta(days=days)
    assert t["death"][0]["death_date"] == dt.date(2023, 2, 1) + dt.timedelta(days=days)
    assert t["observation_period"][0]["observation_period_start_date"] == dt.date(2021, 6, 1) + dt.timedelta(days=days)
    # birth: the year of the shifted date only; over 89 aggregated (Safe Harbor)
    young = person[KEYS.pseudonym("Patient", "zz-mrn-1")]
    assert young["year_of_birth"] == (dt.date(1961, 4, 12) + dt.timedelta(days=days)).year
    assert young["month_of_birth"] is None and young["day_of_birth"] is None and young["birth_datetime"] is None
    assert person[KEYS.pseudonym("Patient", "aa-old")]["year_of_birth"] == 2024 - 90
    # free text gone; UIDs the project's (as the de-identified DICOM export and WADO name them)
    obs = t["observation"][0]
    assert obs["value_as_string"] is None and obs["value_source_value"] is None
    io = t["image_occurrence"][0]
    assert io["image_study_uid"] == KEYS.uid_for(STUDY) and io["image_series_uid"] == KEYS.uid_for(SERIES)
    assert io["wadors_uri"] == f"/dicomweb/studies/{KEYS.uid_for(STUDY)}/series/{KEYS.uid_for(SERIES)}"
    assert io["image_occurrence_date"] == dt.date(2021, 6, 2) + dt.timedelta(days=days)
    text = repr(t)
    for phi in ("zz-mrn-1", "aa-old", "Zebulon", "Wallaby", STUDY, "1961-04-12", "2021-06-01"):
        assert phi not in text, phi
    # the identified rows are left as they were
    assert result.tables["person"][1]["person_source_value"] == "zz-mrn-1"
    assert result.tables["visit_occurrence"][0]["visit_start_date"] == dt.date(2021, 6, 1)
