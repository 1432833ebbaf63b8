"""One patient, three de-identified exports: OMOP rows, FHIR Bulk NDJSON and DICOM (WADO-RS under
``deid_wado``) carry the same pseudonym, the same date shift and the same UIDs; a client follows the UIDs of
de-identified QIDO-RS answers into WADO-RS.  Roles the policy leaves identified get the rows as stored."""

from __future__ import annotations

import csv
import datetime as dt
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway import keys
from gateway.app import create_app
from gateway.context import Purpose, Requester
from gateway.services.consent import ConsentGate
from tests.bulk_client import BulkClient
from tests.conftest import Gateway, make_settings
from tests.dicom_synth import ct_series, stow_body
from tests.integration.test_consent_enforcement import OBO, POLICY, _load

PID = "p-gru"  # permitted for GRU research (tests/integration/test_consent_enforcement.py)
GRU = {"codes": ["DUO:0000042"]}
ANALYST = Requester("t-analyst", frozenset({"analyst"}), None, {}, Purpose("research", ("DUO:0000042",)))
BOUNDARY = "fedgateDEIDboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FHIR_JSON = {"Content-Type": "application/fhir+json"}
ENCOUNTER = {"resourceType": "Encounter", "id": "e-tl", "status": "finished",
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
             "subject": {"reference": f"Patient/{PID}"},
             "period": {"start": "2021-06-01T10:00:00Z", "end": "2021-06-01T11:00:00Z"}}
STUDY_DATE = "20210602"


def _settings(tmp_path, db_url, policy_rules: str = ""):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    return make_settings(tmp_path / "data", db_url, deid_wado=True, deid_secret="consistency-secret-0123456789",
                         deid_policy=policy_rules,
                         extra={"consent": {"policy": str(policy), "disease_ontologies": [str(OBO)], "refresh_s": 0},
                                "export": {"poll_s": 0.1, "retry_after_s": 1}})


async def _start(settings) -> Gateway:
    app = create_app(settings)
    app[keys.GATE] = ConsentGate(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Gateway(server, settings)


@pytest.fixture
async def deid_site(tmp_path, db_url):
    gw = await _start(_settings(tmp_path, db_url))
    try:
        yield gw
    finally:
        await gw.server.close()


async def _load_patient(gw: Gateway, http: aiohttp.ClientSession) -> list:
    await _load(gw, http)
    async with http.put(f"{gw.fhir}/Encounter/{ENCOUNTER['id']}", json=ENCOUNTER,
                        headers=gw.headers("ehr-system") | FHIR_JSON) as r:
        assert r.status in (200, 201), await r.text()
    series = ct_series(patient_id=PID, patient_name="Quartermaine^Zebulon", n=2, size=16, study_date=STUDY_DATE)
    async with http.post(f"{gw.dicomweb}/studies", data=stow_body(series, BOUNDARY),
                         headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 200, await r.text()
    return series


async def _omop_csv(gw: Gateway, http: aiohttp.ClientSession, name: str) -> dict[str, list[dict]]:
    async with http.post(gw.url + "/omop/export", json={"format": "csv", "name": name},
                         headers=gw.headers("analyst", purpose=GRU)) as r:
        assert r.status == 200, await r.text()
    out = {}
    for table in ("person", "visit_occurrence", "image_occurrence", "procedure_occurrence"):
        with (gw.settings.data_dir / "exports" / name / f"{table}.csv").open(newline="") as f:
            out[table] = list(csv.DictReader(f))
    return out


async def test_omop_fhir_and_dicom_share_the_patient_shift_and_pseudonym(deid_site):
    gw = deid_site
    async with aiohttp.ClientSession() as http:
        series = await _load_patient(gw, http)
        study, series_uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        k = gw.app[keys.DEID].keys_for(ANALYST)
        days = k.date_offset_days(PID)
        pseudonym = k.pseudonym("Patient", PID)

        omop = await _omop_csv(gw, http, "deid")
        assert [p["person_source_value"] for p in omop["person"]] == [pseudonym]  # only p-gru is permitted
        (visit,) = omop["visit_occurrence"]
        (image,) = omop["image_occurrence"]

        # FHIR Bulk Data: the Encounter, de-identified for the same project
        client = BulkClient(http, gw.fhir, gw.token("analyst", purpose=GRU))
        manifest, files = await client.export("Patient/$export", [("_type", "Patient,Encounter")])
        assert manifest["extension"]["https://fedgate.dev/fhir/bulk/deidentified"] is True
        (patient,) = files["Patient"]
        (encounter,) = files["Encounter"]
        assert patient["id"] == pseudonym and encounter["subject"]["reference"] == f"Patient/{pseudonym}"

        # DICOM: WADO-RS metadata of the study, de-identified (deid_wado), addressed by the OMOP row's URI
        async with http.get(gw.url + image["wadors_uri"] + "/metadata",
                            headers=gw.headers("analyst", purpose=GRU) | {"Accept": "application/dicom+json"}) as r:
            assert r.status == 200, await r.text()
            meta = await r.json()
        assert {m["00100020"]["Value"][0] for m in meta} == {pseudonym}
        assert {m["0020000D"]["Value"][0] for m in meta} == {image["image_study_uid"]} == {k.uid_for(study)}
        assert {m["0020000E"]["Value"][0] for m in meta} == {image["image_series_uid"]} == {k.uid_for(series_uid)}
        dicom_date = {m["00080020"]["Value"][0] for m in meta}

        # one shift in the three exports
        src_visit = dt.date(2021, 6, 1)
        shifted_visit = (src_visit + dt.timedelta(days=days)).isoformat()
        assert visit["visit_start_date"] == encounter["period"]["start"][:10] == shifted_visit
        shifted_study = (dt.date(2021, 6, 2) + dt.timedelta(days=days))
        assert dicom_date == {shifted_study.strftime("%Y%m%d")}
        assert image["image_occurrence_date"] == shifted_study.isoformat()
        assert days != 0


async def test_identified_policy_leaves_the_omop_export_as_stored(tmp_path, db_url):
    gw = await _start(_settings(tmp_path, db_url, "analyst=identified"))
    try:
        async with aiohttp.ClientSession() as http:
            series = await _load_patient(gw, http)
            omop = await _omop_csv(gw, http, "identified")
    finally:
        await gw.server.close()
    assert [p["person_source_value"] for p in omop["person"]] == [PID]
    assert omop["visit_occurrence"][0]["visit_start_date"] == "2021-06-01"
    (image,) = omop["image_occurrence"]
    assert image["image_study_uid"] == series[0].StudyInstanceUID and image["image_occurrence_date"] == "2021-06-02"


async def test_qido_answers_deidentified_like_wado_and_their_uids_lead_into_wado(deid_site):
    gw = deid_site
    analyst = gw.headers("analyst", purpose=GRU) | {"Accept": "application/dicom+json"}
    clinician = gw.headers("clinician") | {"Accept": "application/dicom+json"}
    async with aiohttp.ClientSession() as http:
        series = await _load_patient(gw, http)
        src_study, src_series = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        k = gw.app[keys.DEID].keys_for(ANALYST)

        async def get(url: str, headers=analyst, **params) -> tuple[int, object]:
            async with http.get(url, headers=headers, params=params) as r:
                return r.status, (await r.json(content_type=None)) if r.status != 204 else None

        status, studies = await get(f"{gw.dicomweb}/studies", includefield="all")
        assert status == 200
        (study,) = studies
        text = json.dumps(studies)
        for phi in ("Quartermaine", "Zebulon", PID, src_study, "ACC1", STUDY_DATE):
            assert phi not in text, phi
        assert study["0020000D"]["Value"] == [k.uid_for(src_study)]
        url = study["00081190"]["Value"][0]
        assert url.endswith(f"/studies/{k.uid_for(src_study)}")
        # the RetrieveURL leads into WADO-RS; the attributes both answers carry are equal
        status, meta = await get(url + "/metadata")
        assert status == 200 and len(meta) == 2
        common = set(study) & set(meta[0]) - {"00081190"}
        assert {"00100020", "00080020", "00080050", "0020000D", "00100010"} <= common
        for tag in common:
            assert study[tag] == meta[0][tag], tag

        # series and instances under the study's project UID; their RetrieveURLs resolve too
        status, found = await get(url + "/series")
        assert status == 200 and [s["0020000E"]["Value"] for s in found] == [[k.uid_for(src_series)]]
        status, found = await get(found[0]["00081190"]["Value"][0] + "/instances")
        assert status == 200 and len(found) == 2
        assert {i["00080018"]["Value"][0] for i in found} == {k.uid_for(d.SOPInstanceUID) for d in series}
        for inst in found:
            status, meta = await get(inst["00081190"]["Value"][0] + "/metadata")
            assert status == 200 and meta[0]["00080018"] == inst["00080018"]
            async with http.get(inst["00081190"]["Value"][0] + "/frames/1",
                                headers=gw.headers("analyst", purpose=GRU)) as r:
                assert r.status == 200
        # project UIDs as match keys; identifying match keys refused
        status, found = await get(f"{gw.dicomweb}/instances", StudyInstanceUID=k.uid_for(src_study),
                                  SOPInstanceUID=k.uid_for(series[1].SOPInstanceUID))
        assert status == 200 and [i["00080018"]["Value"][0] for i in found] == [k.uid_for(series[1].SOPInstanceUID)]
        for key, value in (("PatientName", "Quartermaine*"), ("PatientID", PID), ("StudyDate", STUDY_DATE),
                           ("AccessionNumber", "ACC1")):
            status, body = await get(f"{gw.dicomweb}/studies", **{key: value})
            assert status == 400, (key, body)
        status, _ = await get(f"{gw.dicomweb}/instances", SOPInstanceUID=k.uid_for(series[1].SOPInstanceUID))
        assert status == 400  # a series/instance UID is looked up within one study
        # treatment: identified, source UIDs
        status, found = await get(f"{gw.dicomweb}/studies", clinician, PatientID=PID)
        assert status == 200 and [s["0020000D"]["Value"] for s in found] == [[src_study]]
        assert "Quartermaine" in json.dumps(found)


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _withheld_series(study_uid: str | None, patient_id: str = PID) -> list:
    """Two instances the profile withholds: one flagged BurnedInAnnotation YES, one Secondary Capture."""
    series = ct_series(patient_id=patient_id, patient_name="Quartermaine^Zebulon", n=2, size=16,
                       study_uid=study_uid, study_date=STUDY_DATE)
    series[0].BurnedInAnnotation = "YES"
    series[1].SOPClassUID = series[1].file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    return series


async def test_deidentified_qido_neither_shows_nor_counts_withheld_instances(deid_site):
    gw = deid_site
    analyst = gw.headers("analyst", purpose=GRU) | {"Accept": "application/dicom+json"}
    clinician = gw.headers("clinician") | {"Accept": "application/dicom+json"}
    async with aiohttp.ClientSession() as http:
        released = await _load_patient(gw, http)  # study A: a CT series of two releasable instances
        src_study = released[0].StudyInstanceUID
        stored = [
            _withheld_series(src_study),  # study A: a second series, all of it withheld
            _withheld_series(None),  # study B: withheld as a whole
            ct_series(patient_id="p-withdrawn", patient_name="Other^Patient", n=1, size=16),  # refused by consent
        ]
        for series in stored:
            async with http.post(f"{gw.dicomweb}/studies", data=stow_body(series, BOUNDARY),
                                 headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
                assert r.status == 200, await r.text()
        k = gw.app[keys.DEID].keys_for(ANALYST)
        study = k.uid_for(src_study)

        async def get(url: str, headers=analyst, **params) -> tuple[list, int, str]:
            async with http.get(url, headers=headers, params=params) as r:
                assert r.status in (200, 204), await r.text()
                found = (await r.json(content_type=None)) if r.status == 200 else []
                return found, int(r.headers["X-Total-Count"]), r.headers.get("Warning", "")

        for url, params, n in ((f"{gw.dicomweb}/studies", {}, 1),
                               (f"{gw.dicomweb}/studies", {"includefield": "all"}, 1),
                               (f"{gw.dicomweb}/studies/{study}/series", {}, 1),
                               (f"{gw.dicomweb}/series", {"StudyInstanceUID": study}, 1),
                               (f"{gw.dicomweb}/studies/{study}/instances", {}, 2),
                               (f"{gw.dicomweb}/studies/{study}/instances", {"includefield": "00280301"}, 2),
                               (f"{gw.dicomweb}/instances", {"StudyInstanceUID": study}, 2)):
            found, total, _ = await get(url, **params)
            assert total == len(found) == n, (url, params, total, len(found))
        # paging: the total and the "more results" note count released instances only
        found, total, warning = await get(f"{gw.dicomweb}/studies/{study}/instances", limit="1")
        assert (len(found), total) == (1, 2) and "1 more results" in warning
        found, total, warning = await get(f"{gw.dicomweb}/studies/{study}/instances", limit="1", offset="1")
        assert (len(found), total) == (1, 2) and "more results" not in warning
        assert {i["00080018"]["Value"][0] for i in found} <= {k.uid_for(d.SOPInstanceUID) for d in released}
        # a study whose first instance is withheld still answers with a released one's attributes
        found, total, _ = await get(f"{gw.dicomweb}/studies", includefield="all")
        assert total == 1 and found[0]["0020000D"]["Value"] == [study]
        assert found[0].get("00080016", {}).get("Value", [None])[0] != SECONDARY_CAPTURE
        # treatment, identified: everything stored, withheld instances and the other patient included
        found, total, _ = await get(f"{gw.dicomweb}/studies", clinician)
        assert total == len(found) == 3
        found, total, _ = await get(f"{gw.dicomweb}/studies/{src_study}/instances", clinician)
        assert total == len(found) == 4
