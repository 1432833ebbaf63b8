"""Issue 3: DICOMweb round trip through the running server with the real dicomweb-client.

Expected values are computed here from the files with plain pydicom (never from fedgate code).
Both engines (the ``gateway`` fixture is parametrised over SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from sqlalchemy import select

from gateway import keys
from gateway.store.dicom_schema import dcm_seg_segment, dcm_sr_item, dcm_study
from tests.conftest import data_path
from tests.dicom_synth import ct_series

DEMO = sorted(data_path("dicom").rglob("*.dcm"))


def _client(gw, role: str = "pacs") -> DICOMwebClient:
    return DICOMwebClient(url=gw.dicomweb, headers=gw.headers(role))


def _uid(ds_json: dict, tag: str) -> str:
    return ds_json[tag]["Value"][0]


@pytest.fixture
async def loaded(gateway):
    """Demo DICOM (CT, MR, SR TID1500, SEG) + two synthetic CT studies, stored with dicomweb-client."""
    files = [pydicom.dcmread(p) for p in DEMO]
    synth = (ct_series(patient_id="SYN1", patient_name="Synthetic^Anna", study_date="20230105", n=6)
             + ct_series(patient_id="SYN2", patient_name="Synthetic^Bert", study_date="20240610", n=4,
                         manufacturer="Globex", modality="CT"))
    every = files + synth
    client = _client(gateway)
    # two requests: STOW-RS of several instances per request, like a PACS
    r1 = await asyncio.to_thread(client.store_instances, every[:12])
    r2 = await asyncio.to_thread(client.store_instances, every[12:])
    refs = list(r1.get("ReferencedSOPSequence", [])) + list(r2.get("ReferencedSOPSequence", []))
    assert "FailedSOPSequence" not in r1 and "FailedSOPSequence" not in r2
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in refs) == sorted(str(d.SOPInstanceUID) for d in every)
    return every


async def test_qido_matches_source(gateway, loaded, http):
    client = _client(gateway, "clinician")
    by_study = defaultdict(list)
    for ds in loaded:
        by_study[str(ds.StudyInstanceUID)].append(ds)
    studies = await asyncio.to_thread(client.search_for_studies)
    assert sorted(_uid(s, "0020000D") for s in studies) == sorted(by_study)
    for s in studies:
        dss = by_study[_uid(s, "0020000D")]
        assert s["00201208"]["Value"][0] == len(dss)
        assert sorted(s["00080061"]["Value"]) == sorted({str(d.Modality) for d in dss})

    # PatientName with a wildcard, case-insensitive
    expected = {u for u, dss in by_study.items() if str(dss[0].get("PatientName", "")).upper().startswith("SYNTH")}
    got = await asyncio.to_thread(client.search_for_studies, search_filters={"PatientName": "synth*"})
    assert {_uid(s, "0020000D") for s in got} == expected and len(expected) == 2
    # fuzzy matching on a later name component
    got = await asyncio.to_thread(client.search_for_studies, search_filters={"PatientName": "bert"},
                                  fuzzymatching=True)
    assert len(got) == 1
    # StudyDate range
    expected = {u for u, dss in by_study.items() if "20200101" <= str(dss[0].get("StudyDate", "")) <= "20231231"}
    got = await asyncio.to_thread(client.search_for_studies, search_filters={"StudyDate": "20200101-20231231"})
    assert {_uid(s, "0020000D") for s in got} == expected
    # ModalitiesInStudy with paging: every CT study exactly once, totals right on every page
    ct = {u for u, dss in by_study.items() if any(str(d.Modality) == "CT" for d in dss)}
    seen, offset = [], 0
    while True:
        async with http.get(f"{gateway.dicomweb}/studies", headers=gateway.headers("clinician"),
                            params={"ModalitiesInStudy": "CT", "limit": "2", "offset": str(offset)}) as r:
            assert r.status == 200
            assert int(r.headers["X-Total-Count"]) == len(ct)
            page = await r.json()
        if not page:
            break
        seen += [_uid(s, "0020000D") for s in page]
        offset += 2
    assert sorted(seen) == sorted(ct)
    # nested series / instances, SOPClassUID and Modality keys, includefield
    study_uid, dss = next((u, d) for u, d in by_study.items() if len(d) > 1)
    series = await asyncio.to_thread(client.search_for_series, study_uid)
    assert sorted(_uid(s, "0020000E") for s in series) == sorted({str(d.SeriesInstanceUID) for d in dss})
    insts = await asyncio.to_thread(client.search_for_instances, study_uid, _uid(series[0], "0020000E"))
    assert len(insts) == sum(1 for d in dss if str(d.SeriesInstanceUID) == _uid(series[0], "0020000E"))
    sr = await asyncio.to_thread(client.search_for_instances,
                                 search_filters={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"})
    assert len(sr) == sum(1 for d in loaded if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34")
    mr = await asyncio.to_thread(client.search_for_series, search_filters={"Modality": "MR"},
                                 fields=["SeriesDate", "00180050"])
    assert {_uid(s, "0020000E") for s in mr} == {str(d.SeriesInstanceUID) for d in loaded if d.Modality == "MR"}
    assert all("00180050" in s for s in mr)  # SliceThickness included on request
    async with http.get(f"{gateway.dicomweb}/studies", params={"Colour": "red"},
                        headers=gateway.headers("clinician")) as r:
        assert r.status == 400
    async with http.get(f"{gateway.dicomweb}/studies", headers=gateway.headers("clinician") | {"Accept": "text/xml"}) as r:
        assert r.status == 406


async def test_wado_retrieve_metadata_frames_rendered(gateway, loaded, http):
    client = _client(gateway, "clinician")
    images = [d for d in loaded if "PixelData" in d and d.get("BitsAllocated") == 16]
    for ds in images[:4] + [d for d in images if d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"][:1]:
        st, se, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        explicit = await asyncio.to_thread(client.retrieve_instance, st, se, sop,
                                           media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
        assert explicit.SOPInstanceUID == sop and explicit.PixelData == ds.PixelData
        assert explicit.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # transcoded if stored implicit
        as_stored = await asyncio.to_thread(client.retrieve_instance, st, se, sop)  # dicomweb-client asks for *
        assert as_stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert as_stored.PixelData == ds.PixelData
        frame = (await asyncio.to_thread(client.retrieve_instance_frames, st, se, sop, [1]))[0]
        per = int(ds.Rows) * int(ds.Columns) * 2
        assert frame == ds.PixelData[:per]
        meta = (await asyncio.to_thread(client.retrieve_instance_metadata, st, se, sop))
        assert meta["00080018"]["Value"] == [sop]
        bulk_uri = meta["7FE00010"]["BulkDataURI"]
        async with http.get(bulk_uri, headers=gateway.headers("clinician")) as r:
            assert r.status == 200
            body = await r.read()
        assert ds.PixelData in body
        png = await asyncio.to_thread(client.retrieve_instance_rendered, st, se, sop, media_types=("image/png",))
        assert Image.open(io.BytesIO(png)).size == (int(ds.Columns), int(ds.Rows))
        jpg = await asyncio.to_thread(client.retrieve_instance_rendered, st, se, sop,
                                      params={"window": "40,400,linear", "viewport": "32,32"})
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and max(img.size) == 32
    synth = [d for d in loaded if str(d.PatientID) == "SYN1"]
    st, se = str(synth[0].StudyInstanceUID), str(synth[0].SeriesInstanceUID)
    series = await asyncio.to_thread(client.retrieve_series, st, se)
    assert sorted(str(d.SOPInstanceUID) for d in series) == sorted(str(d.SOPInstanceUID) for d in synth)
    md = await asyncio.to_thread(client.retrieve_study_metadata, st)
    assert len(md) == len(synth)
    async with http.get(f"{gateway.dicomweb}/studies/{st}/thumbnail", headers=gateway.headers("clinician")) as r:
        assert r.status == 200 and r.content_type == "image/jpeg"
        assert max(Image.open(io.BytesIO(await r.read())).size) == 128
    async with http.get(f"{gateway.dicomweb}/studies/{st}/series/{se}/instances/{synth[0].SOPInstanceUID}/frames/9",
                        headers=gateway.headers("clinician")) as r:
        assert r.status == 404  # one frame only
    async with http.get(f"{gateway.dicomweb}/studies/{st}/rendered", headers=gateway.headers("clinician")
                        | {"Accept": "image/gif"}) as r:
        assert r.status == 406
    async with http.get(f"{gateway.dicomweb}/studies/1.2.3.4", headers=gateway.headers("clinician")) as r:
        assert r.status == 404


async def test_imaging_study_sync_and_patient_match(gateway, http):
    h = gateway.headers("ehr-system") | {"Content-Type": "application/fhir+json"}
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN77"}],
               "gender": "female"}
    async with http.post(gateway.fhir + "/Patient", json=patient, headers=h) as r:
        pid = (await r.json())["id"]
    first = ct_series(patient_id="MRN77", patient_name="Matched^Mary", issuer="1.2.3.4", n=3)
    client = _client(gateway)
    await asyncio.to_thread(client.store_instances, first)
    study = str(first[0].StudyInstanceUID)
    async with http.get(f"{gateway.fhir}/ImagingStudy/{study}", headers=h) as r:
        assert r.status == 200
        res = await r.json()
    assert res["subject"]["reference"] == f"Patient/{pid}"
    assert res["numberOfInstances"] == 3 and res["numberOfSeries"] == 1
    assert res["endpoint"][0]["reference"] == "Endpoint/dicomweb"
    # more instances of the same study, another series: the ImagingStudy follows
    more = ct_series(patient_id="MRN77", patient_name="Matched^Mary", issuer="1.2.3.4", n=2, study_uid=study,
                     modality="CT")
    await asyncio.to_thread(client.store_instances, more, study)
    async with http.get(f"{gateway.fhir}/ImagingStudy?patient={pid}", headers=h) as r:
        bundle = await r.json()
    assert bundle["total"] == 1
    res = bundle["entry"][0]["resource"]
    assert res["numberOfInstances"] == 5 and res["numberOfSeries"] == 2
    assert res["meta"]["versionId"] == "2"
    async with gateway.app[keys.DB].read() as conn:
        row = (await conn.execute(select(dcm_study.c.patient_id).where(dcm_study.c.study_uid == study))).one()
    assert row.patient_id == pid


def _walk_items(ds) -> list:
    out = [ds]
    for child in ds.get("ContentSequence") or ():
        out += _walk_items(child)
    return out


async def test_sr_and_seg_content_indexed(gateway, loaded):
    srs = [d for d in loaded if str(d.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88.")]
    segs = [d for d in loaded if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"]
    assert srs and segs
    async with gateway.app[keys.DB].read() as conn:
        for sr in srs:
            rows = (await conn.execute(select(dcm_sr_item).where(dcm_sr_item.c.sop_uid == str(sr.SOPInstanceUID))
                                       .order_by(dcm_sr_item.c.id))).mappings().all()
            items = _walk_items(sr)
            assert len(rows) == len(items)
            nums = sorted(float(i.MeasuredValueSequence[0].NumericValue) for i in items
                          if i.get("ValueType") == "NUM" and i.get("MeasuredValueSequence"))
            assert sorted(r["num_value"] for r in rows if r["num_value"] is not None) == pytest.approx(nums)
            codes = sorted(i.ConceptNameCodeSequence[0].CodeValue for i in items if i.get("ConceptNameCodeSequence"))
            assert sorted(r["concept_code"] for r in rows if r["concept_code"]) == codes
        for seg in segs:
            rows = (await conn.execute(select(dcm_seg_segment).where(
                dcm_seg_segment.c.sop_uid == str(seg.SOPInstanceUID)))).mappings().all()
            assert sorted((r["segment_number"], r["label"]) for r in rows) == sorted(
                (int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence)


async def test_patient_with_the_same_value_under_two_systems_is_matched(gateway, http):
    h = gateway.headers("ehr-system") | {"Content-Type": "application/fhir+json"}
    patient = {"resourceType": "Patient", "identifier": [{"system": "https://example.org/mrn", "value": "DUP9"},
                                                         {"system": "http://hospital.smarthealthit.org", "value": "DUP9"}]}
    async with http.post(gateway.fhir + "/Patient", json=patient, headers=h) as r:
        pid = (await r.json())["id"]
    series = ct_series(patient_id="DUP9", patient_name="Two^Systems", n=1)
    await asyncio.to_thread(_client(gateway).store_instances, series)
    async with http.get(f"{gateway.fhir}/ImagingStudy/{series[0].StudyInstanceUID}", headers=h) as r:
        assert (await r.json())["subject"]["reference"] == f"Patient/{pid}"


async def test_empty_research_scope_selects_nobody(gateway):
    from gateway.store.scope import AccessScope

    scope = AccessScope(unrestricted=False, allowed_profiles=frozenset(), summary="none")
    async with gateway.app[keys.DB].read() as conn:
        assert (await conn.execute(scope.patient_ids_subquery())).all() == []
