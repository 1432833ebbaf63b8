"""OMOP vocabulary loading (shipped subset and an Athena-format download) and pure export helpers."""

from __future__ import annotations

import csv

from mappings.omop import ddl
from mappings.omop.export import CmData, export_rows, to_date, vocabulary_rows
from mappings.vocab import load_subset, load_vocabulary

ATHENA_HEADER = ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
                 "concept_code", "valid_start_date", "valid_end_date", "invalid_reason"]


def _write_tsv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def test_subset_ids_are_unique_and_cover_person_vocabularies():
    with open(ddl.DDL_DIR.parent.parent / "vocab" / "concepts.csv", newline="") as f:
        ids = [int(r["concept_id"]) for r in csv.DictReader(f)]
    assert len(ids) == len(set(ids))
    v = load_subset()
    assert v.map_source("fhir-gender", "female").concept_id == 8532
    assert v.map_source("cdc-race", "2106-3").concept_id == 8527
    assert v.map_system("http://loinc.org", "8302-2").concept_id == 3036277
    assert v.map_system("http://loinc.org", "no-such-code").concept_id == 0
    assert v.map_dicom("CT").concept_id == 2128009190


def test_athena_download_follows_maps_to(tmp_path):
    _write_tsv(tmp_path / "CONCEPT.csv", ATHENA_HEADER, [
        [201826, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "S", "44054006", "19700101", "20991231", ""],
        [45576876, "Type 2 diabetes mellitus without complications", "Condition", "ICD10CM", "5-char billing code", "", "E11.9",
         "19700101", "20991231", ""],
        [99, "old", "Condition", "ICD10CM", "x", "", "E11.0", "19700101", "20001231", "D"],
    ])
    _write_tsv(tmp_path / "CONCEPT_RELATIONSHIP.csv",
               ["concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date", "invalid_reason"],
               [[45576876, 201826, "Maps to", "19700101", "20991231", ""]])
    v = load_vocabulary(tmp_path)
    m = v.map_system("http://hl7.org/fhir/sid/icd-10-cm", "E11.9")
    assert (m.concept_id, m.source_concept_id, m.domain) == (201826, 45576876, "Condition")
    assert v.map_system("http://hl7.org/fhir/sid/icd-10-cm", "E11.0").concept_id == 0  # invalid concepts skipped
    assert v.map_source("fhir-gender", "male").concept_id == 0  # 8507 not in this (partial) download


def test_export_skips_rows_without_required_dates_and_reports_coverage():
    v = load_subset()
    data = CmData(
        patients=[{"patient_id": "p1", "birth_date": "1980-05", "sex": "male"}, {"patient_id": "p2", "birth_date": None}],
        conditions=[{"pk": 1, "patient_id": "p1", "system": "http://snomed.info/sct", "code": "444814009", "onset": "2010-01-02"},
                    {"pk": 2, "patient_id": "p1", "system": "http://snomed.info/sct", "code": "1", "onset": None},
                    {"pk": 3, "patient_id": "p2", "system": "http://snomed.info/sct", "code": "1", "onset": "2010-01-02"}],
    )
    out = export_rows(data, v)
    assert [p["month_of_birth"] for p in out.tables["person"]] == [5]
    assert out.tables["person"][0]["day_of_birth"] is None
    assert [c["condition_concept_id"] for c in out.tables["condition_occurrence"]] == [40481087]
    rep = out.coverage.report()
    skipped = {(r["table"], r["reason"]): r["count"] for r in rep["skipped"]}
    assert skipped == {("person", "no year of birth"): 1, ("condition_occurrence", "no onset date"): 1,
                       ("condition_occurrence", "no exported person"): 1}
    vr = vocabulary_rows(v, out.concept_ids)
    assert {c["concept_id"] for c in vr["concept"]} >= {0, 8507, 40481087, 32817}
    assert to_date("20210304").isoformat() == "2021-03-04" and to_date("bad") is None
