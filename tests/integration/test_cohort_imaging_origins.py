"""Cohort `imaging` criterion over the common model (issue 23), both engines: a study known only from a
FHIR ImagingStudy (posted over the API) or only from an OMOP image_occurrence import (cm_imaging_series
rows as the importer writes them) matches like a DICOM-indexed one, on the fields that origin carries;
a criterion on a DICOM-only field (manufacturer, slice thickness, ...) matches DICOM studies only."""

from __future__ import annotations

import aiohttp
from sqlalchemy import insert

from gateway import keys
from gateway.store import schema as s
from gateway.store.dicom_schema import dcm_series, dcm_study
from gateway.store.cohort import compile_cohort
from gateway.store.scope import UNRESTRICTED
from mappings.cohort.language import parse
from mappings.omop.importer import imaging_series_rows, imaging_rows
from mappings.vocab import load_subset

FHIR_JSON = {"Content-Type": "application/fhir+json"}


async def test_imaging_criterion_matches_every_origin(gateway):
    h = gateway.headers("ehr-system") | FHIR_JSON
    study = {"resourceType": "ImagingStudy", "id": "is-fhir", "status": "available",
             "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4.5"}],
             "subject": {"reference": "Patient/p-fhir"}, "started": "2021-03-01T10:00:00Z",
             "description": "Cardiac MRI", "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}],
             "series": [{"uid": "1.2.3.4.5.1", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}}]}
    async with aiohttp.ClientSession() as http:
        for r in ({"resourceType": "Patient", "id": "p-fhir", "birthDate": "1960-01-01"}, study,
                  {"resourceType": "Patient", "id": "p-none", "birthDate": "1960-01-01"}):
            async with http.put(f"{gateway.fhir}/{r['resourceType']}/{r['id']}", json=r, headers=h) as resp:
                assert resp.status in (200, 201), await resp.text()
    vocab = load_subset()
    ct = next(c.concept_id for c in vocab.by_id.values() if c.vocabulary == "DICOM" and c.code == "CT")
    chest = next(c.concept_id for c in vocab.by_id.values() if c.vocabulary == "DICOM" and c.code == "CHEST")
    io = [{"image_occurrence_id": 7, "person_id": 42, "image_study_uid": "9.8.7", "image_series_uid": "9.8.7.1",
           "modality_concept_id": ct, "anatomic_site_concept_id": chest, "image_occurrence_date": "2019-05-02"}]
    db = gateway.app[keys.DB]
    async with db.write() as conn:
        await conn.execute(insert(s.cm_patient), [{"src_type": "OMOP", "src_id": "person/42", "patient_id": "omop-42",
                                                   "birth_date": "1950", "birth_year": 1950}])
        await conn.execute(insert(s.cm_imaging_study), imaging_rows(vocab, io))
        await conn.execute(insert(s.cm_imaging_series), imaging_series_rows(vocab, io))
        await conn.execute(insert(s.cm_patient), [{"src_type": "synthetic", "src_id": "Patient/p-dcm",
                                                   "patient_id": "p-dcm", "birth_date": "1970-01-01", "birth_year": 1970}])
        await conn.execute(insert(dcm_study), [{"study_uid": "5.5.5", "patient_id": "p-dcm", "study_date": "20200101",
                                                "modalities": "MR", "num_series": 1, "num_instances": 1, "updated_ts": 0.0}])
        await conn.execute(insert(dcm_series), [{"series_uid": "5.5.5.1", "study_uid": "5.5.5", "patient_id": "p-dcm",
                                                 "modality": "MR", "body_part": "HEART", "manufacturer": "SIEMENS",
                                                 "slice_thickness": 8.0, "num_instances": 1, "updated_ts": 0.0}])

    async def cohort(crit: dict) -> set[str]:
        async with db.read() as conn:
            return {r[0] for r in (await conn.execute(compile_cohort(parse({"imaging": crit}), UNRESTRICTED))).all()}

    assert await cohort({"modality": "MR"}) == {"p-fhir", "p-dcm"}
    assert await cohort({"modality": "CT"}) == {"omop-42"}
    assert await cohort({"modality": ["CT", "MR"]}) == {"p-fhir", "p-dcm", "omop-42"}
    assert await cohort({"body_part": "CHEST"}) == {"omop-42"}  # FHIR: no body part projected
    assert await cohort({"body_part": "HEART"}) == {"p-dcm"}
    assert await cohort({"study_description": "cardiac*"}) == {"p-fhir"}  # DICOM row has no description
    assert await cohort({"modality": "MR", "study_date": {"from": "2021-01-01"}}) == {"p-fhir"}
    assert await cohort({"study_date": {"to": "2019-12-31"}}) == {"omop-42"}
    assert await cohort({"manufacturer": "siemens"}) == {"p-dcm"}  # a DICOM-only field
    assert await cohort({"slice_thickness": {"min": 5}}) == {"p-dcm"}
