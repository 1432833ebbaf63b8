"""Issue #19, leak 4: studies holding instances of two patients (a PACS merge error, a reused UID).

Two such studies are stored with pydicom-built instances: in S1 the refused patient's instances arrive
first (the study row is theirs), in S2 the permitted patient's do; each has a series of each patient and
one series holding an instance of both.  For a research scope every answer — QIDO at the three levels with
``includefield=all``, ``X-Total-Count``, matching on the refused patient's attributes, WADO (metadata,
retrieve, frames, rendered, thumbnail, bulkdata), the FHIR ImagingStudy and the OMOP ``image_occurrence``
export — is built from the permitted patient's instances only: the refused patient's name, ID, comments,
series and instances never appear.  Treatment sees the study whole; admins are told about the conflict
(``Warning`` header, ``fedgate dicom-conflicts``)."""

from __future__ import annotations

import csv
import email
import json

import aiohttp

from gateway import keys
from gateway.cli import main as cli_main
from gateway.context import Purpose, Requester
from tests.dicom_synth import ct_series, stow_body, to_bytes
from tests.integration.test_consent_enforcement import FHIR_JSON, _load, site  # (fixture)

BOUNDARY = "fedgateCONFLICTboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
JSON = {"Accept": "application/dicom+json"}
OK, REFUSED = "p-gru", "p-withdrawn"
SECRETS = ("Secret^Refused", REFUSED, "REFUSED-COMMENT", "ACC-REFUSED", "REFUSED STUDY")


def _instances(pid: str, name: str, study: str, shared_series: str, *, n: int, modality: str) -> list:
    own = ct_series(patient_id=pid, patient_name=name, n=n, size=16, study_uid=study, modality=modality,
                    accession="ACC-REFUSED" if pid == REFUSED else "ACC-OK")
    (shared,) = ct_series(patient_id=pid, patient_name=name, n=1, size=16, study_uid=study, modality="CT",
                          accession="ACC-REFUSED" if pid == REFUSED else "ACC-OK")
    shared.SeriesInstanceUID = shared_series
    shared.InstanceNumber = 50 if pid == REFUSED else 51
    out = own + [shared]
    for ds in out:
        ds.PatientComments = "REFUSED-COMMENT" if pid == REFUSED else "fine"
        ds.StudyDescription = "REFUSED STUDY" if pid == REFUSED else "CT CHEST"
    return out


async def _stow(gw, http, datasets) -> None:
    async with http.post(f"{gw.dicomweb}/studies", data=stow_body(datasets, BOUNDARY),
                         headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 200, await r.text()


async def _get(http, url, headers, **params):
    async with http.get(url, params=params, headers=headers) as r:
        body = await r.read()
        return r.status, dict(r.headers), body


async def test_two_patient_studies_answer_research_from_permitted_instances_only(site, tmp_path):
    gw = site
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        studies = {}
        for label, refused_first in (("S1", True), ("S2", False)):
            from pydicom.uid import generate_uid

            study, shared = generate_uid(), generate_uid()
            bad = _instances(REFUSED, "Secret^Refused", study, shared, n=2, modality="MR")
            good = _instances(OK, "Test^Permitted", study, shared, n=3, modality="CT")
            for batch in ((bad, good) if refused_first else (good, bad)):
                await _stow(gw, http, batch)
            studies[label] = {"uid": study, "shared": shared, "good": good, "bad": bad}
        good_sops = {ds.SOPInstanceUID for s in studies.values() for ds in s["good"]}
        bad_sops = {ds.SOPInstanceUID for s in studies.values() for ds in s["bad"]}
        good_series = {ds.SeriesInstanceUID for s in studies.values() for ds in s["good"]}

        h = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}) | JSON

        def clean(body: bytes) -> None:
            text = body.decode("utf-8", "replace")
            for secret in SECRETS + tuple(bad_sops):
                assert secret not in text, secret
            for s in studies.values():  # the refused patient's own series UID
                assert s["bad"][0].SeriesInstanceUID not in text

        # QIDO, every level, everything included
        for level in ("studies", "series", "instances"):
            status, headers, body = await _get(http, f"{gw.dicomweb}/{level}", h, includefield="all", limit="100")
            assert status == 200, body
            clean(body)
            found = json.loads(body)
            assert {i["00100020"]["Value"][0] for i in found} == {OK}
            if level == "studies":
                assert {i["0020000D"]["Value"][0] for i in found} == {s["uid"] for s in studies.values()}
                for item in found:  # counts of the permitted patient's part: 2 series, 4 instances
                    assert item["00201206"]["Value"] == [2] and item["00201208"]["Value"] == [4], item
                    assert item["00080061"]["Value"] == ["CT"]
                    assert item["00104000"]["Value"] == ["fine"]  # PatientComments, from a permitted instance
            if level == "series":
                assert {i["0020000E"]["Value"][0] for i in found} == good_series
                for item in found:
                    if item["0020000E"]["Value"][0] in {s["shared"] for s in studies.values()}:
                        assert item["00201209"]["Value"] == [1]  # the shared series: one permitted instance
            if level == "instances":
                assert {i["00080018"]["Value"][0] for i in found} == good_sops
            assert int(headers["X-Total-Count"]) == len(found)
            assert "conflict" not in headers.get("Warning", "")  # (not told to analysts)
        for s in studies.values():
            st = s["uid"]
            for url, n in ((f"{gw.dicomweb}/studies/{st}/series", 2), (f"{gw.dicomweb}/studies/{st}/instances", 4),
                           (f"{gw.dicomweb}/studies/{st}/series/{s['shared']}/instances", 1)):
                status, headers, body = await _get(http, url, h, includefield="all")
                assert status == 200 and len(json.loads(body)) == n == int(headers["X-Total-Count"]), url
                clean(body)
            # matching on the refused patient's attributes finds nothing (no oracle)
            for params in ({"PatientName": "Secret*"}, {"PatientID": REFUSED}, {"AccessionNumber": "ACC-REFUSED"},
                           {"ModalitiesInStudy": "MR"}, {"StudyDescription": "REFUSED*"}):
                status, headers, body = await _get(http, f"{gw.dicomweb}/studies", h, StudyInstanceUID=st, **params)
                assert headers["X-Total-Count"] == "0" and status in (200, 204), params
            # WADO: only the permitted instances, never the refused ones
            status, _, body = await _get(http, f"{gw.dicomweb}/studies/{st}/metadata", h)
            assert status == 200 and {i["00080018"]["Value"][0] for i in json.loads(body)} == \
                {ds.SOPInstanceUID for ds in s["good"]}
            clean(body)
            status, headers, body = await _get(http, f"{gw.dicomweb}/studies/{st}", h | {
                "Accept": 'multipart/related; type="application/dicom"'})
            msg = email.message_from_bytes(b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            assert status == 200 and len(msg.get_payload()) == 4
            clean(body)
            # the series holding an instance of each patient streams the permitted one only, as stored
            status, headers, body = await _get(http, f"{gw.dicomweb}/studies/{st}/series/{s['shared']}", h | {
                "Accept": 'multipart/related; type="application/dicom"'})
            msg = email.message_from_bytes(b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            assert status == 200 and int(headers["Content-Length"]) == len(body)
            assert [p.get_payload(decode=True) for p in msg.get_payload()] == [to_bytes(s["good"][-1])]
            clean(body)
            status, _, body = await _get(http, f"{gw.dicomweb}/studies/{st}/thumbnail", h | {"Accept": "image/png"})
            assert status == 200
            for ds in s["bad"]:
                inst = f"{gw.dicomweb}/studies/{st}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
                for url, accept in ((inst, 'multipart/related; type="application/dicom"'), (inst + "/metadata", JSON["Accept"]),
                                    (inst + "/frames/1", 'multipart/related; type="application/octet-stream"'),
                                    (inst + "/rendered", "image/png"), (inst + "/thumbnail", "image/png"),
                                    (inst + "/bulkdata/7FE00010", 'multipart/related; type="application/octet-stream"')):
                    status, _, _ = await _get(http, url, h | {"Accept": accept})
                    assert status == 404, (url, status)

        # FHIR ImagingStudy: the study's subject's instances only; S1's subject is the refused patient
        fh = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}) | FHIR_JSON
        status, _, body = await _get(http, f"{gw.fhir}/ImagingStudy/{studies['S2']['uid']}", fh)
        assert status == 200, body
        clean(body)
        res = json.loads(body)
        assert {i["uid"] for se in res["series"] for i in se["instance"]} == {ds.SOPInstanceUID for ds in studies["S2"]["good"]}
        assert res["numberOfInstances"] == 4 and res["numberOfSeries"] == 2
        status, _, body = await _get(http, f"{gw.fhir}/ImagingStudy/{studies['S1']['uid']}", fh)
        assert status == 404
        status, _, body = await _get(http, f"{gw.fhir}/ImagingStudy", fh, _count="100")
        clean(body)

        # OMOP image_occurrence: one row per permitted series, none of the refused patient's
        async with http.post(gw.url + "/omop/export", json={"format": "csv", "name": "conflicts"},
                             headers=gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})) as r:
            assert r.status == 200, await r.text()
        with (gw.settings.data_dir / "exports" / "conflicts" / "image_occurrence.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        text = json.dumps(rows)
        # the analyst's export is de-identified (site policy): series under the project's UIDs
        k = gw.app[keys.DEID].keys_for(Requester("a", frozenset({"analyst"}), None, {}, Purpose("research", ("DUO:0000042",))))
        for s in studies.values():
            assert s["bad"][0].SeriesInstanceUID not in text and k.uid_for(s["bad"][0].SeriesInstanceUID) not in text
        assert {r["image_series_uid"] for r in rows} == {k.uid_for(u) for u in good_series}

        # treatment: the studies whole; admins are told about the conflict
        status, headers, body = await _get(http, f"{gw.dicomweb}/studies", gw.headers("clinician") | JSON,
                                           StudyInstanceUID=studies["S1"]["uid"])
        assert status == 200 and json.loads(body)[0]["00201208"]["Value"] == [7]
        assert "conflict" not in headers.get("Warning", "")
        status, headers, body = await _get(http, f"{gw.dicomweb}/studies", gw.headers("admin") | JSON)
        assert all(s["uid"] in headers["Warning"] and "conflict" in headers["Warning"] for s in studies.values())
    import asyncio
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = await asyncio.to_thread(cli_main, ["dicom-conflicts", "--json", "--data-dir", str(gw.settings.data_dir),
                                                "--database-url", gw.settings.effective_database_url])
    listed = json.loads(buf.getvalue())
    assert rc == 0 and {c["study_uid"] for c in listed} == {s["uid"] for s in studies.values()}
    assert all(c["patients"] == 2 and c["instances"] == 7 for c in listed)
