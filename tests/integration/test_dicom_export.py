"""Imaging cohort export, de-identified (issue #24): consent, DICOMDIR, STOW-RS to Orthanc, SR/SEG
references, pixel data, planted PHI in files, report and logs, deterministic UIDs per project."""

from __future__ import annotations

import asyncio
import contextlib
import email
import hashlib
import io
import json
import logging
from pathlib import Path

import aiohttp
import pydicom
import pytest
import requests
from aiohttp.test_utils import TestServer
from pydicom.fileset import FileSet

from gateway import keys
from gateway.app import create_app
from gateway.cli import main as cli_main
from gateway.context import Purpose, Requester
from gateway.services.dicom_export import ExportTarget
from gateway.services.consent import ConsentGate
from tests.conftest import Gateway, data_path, make_settings
from tests.dicom_synth import ct_series, stow_body
from tests.integration.test_consent_enforcement import OBO, POLICY, _load, consent, site  # noqa: F401 (fixture)
from tests.peers.orthanc import orthanc

BOUNDARY = "fedgateEXPORTboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
OK, REFUSED = "p-gru", "p-withdrawn"
PHI = ("Zebulon", "Quartermaine", "Wallaby", "MRN-PLANT-77", "Refusedname", "19380412")
ANALYST = Requester("t-analyst", frozenset({"analyst"}), None, {}, Purpose("research", ("DUO:0000042",)))
CLINICIAN = Requester("t-clinician", frozenset({"clinician"}), None, {}, Purpose())


def _plant(ds, pid: str, name: str) -> None:
    ds.PatientID = pid
    ds.PatientName = name
    ds.PatientBirthDate = "19380412"
    ds.PatientAddress = "42 Wallaby Way"
    ds.OtherPatientIDs = "MRN-PLANT-77"
    ds.ImageComments = f"{name} MRN-PLANT-77"
    block = ds.private_block(0x0029, "ACME PHI", create=True)
    block.add_new(0x01, "LO", "Zebulon Quartermaine MRN-PLANT-77")


def _datasets() -> tuple[list, list, list]:
    permitted = []
    for p in sorted(data_path("dicom", "dcmqi").rglob("*.dcm")):  # CT, SEG on it, TID 1500 SR + its SEG
        ds = pydicom.dcmread(p)
        _plant(ds, OK, "Quartermaine^Zebulon")
        permitted.append(ds)
    burned = ct_series(patient_id=OK, patient_name="Quartermaine^Zebulon", n=1, size=16)
    for ds in burned:
        _plant(ds, OK, "Quartermaine^Zebulon")
        ds.BurnedInAnnotation = "YES"
    refused = ct_series(patient_id=REFUSED, patient_name="Refusedname^Secret", n=2, size=16)
    for ds in refused:
        _plant(ds, REFUSED, "Refusedname^Secret")
    return permitted, burned, refused


def _read_folder(folder: Path) -> list[pydicom.Dataset]:
    fs = FileSet(folder / "DICOMDIR")
    out = [inst.load() for inst in fs]
    for f in folder.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            for text in PHI + (REFUSED,):
                assert text.encode() not in raw, (f.name, text)
    return out


def _refs(node, out: set[str]) -> set[str]:
    for elem in node:
        if elem.VR == "SQ":
            for item in elem.value:
                _refs(item, out)
        elif elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out


async def test_cohort_export_is_consented_deidentified_and_resolvable(site, tmp_path, caplog):  # noqa: F811
    gw = site
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="gateway")
    caplog.set_level(logging.DEBUG, logger="mappings")
    permitted, burned, refused = _datasets()
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        async with http.post(f"{gw.dicomweb}/studies", data=stow_body(permitted + burned + refused, BOUNDARY),
                             headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
    studies = sorted({d.StudyInstanceUID for d in permitted + burned + refused})
    svc = gw.app[keys.DICOM_EXPORT]
    deid = gw.app[keys.DEID]

    # the analyst, through the CLI (same wiring, progress bar on stderr)
    toml = tmp_path / "site.toml"
    consent = gw.settings.extra["consent"]
    toml.write_text(f'[consent]\npolicy = "{consent["policy"]}"\ndisease_ontologies = ["{consent["disease_ontologies"][0]}"]\n')
    out_a = tmp_path / "analyst"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = await asyncio.to_thread(cli_main, [
            "export", "dicom", *studies, "--out", str(out_a), "--purpose", "DUO:0000042", "--role", "analyst",
            "--project", "default", "--config", str(toml), "--data-dir", str(gw.settings.data_dir),
            "--database-url", gw.settings.effective_database_url, "--no-progress"])
    report = json.loads(stdout.getvalue())
    assert rc == 0, stderr.getvalue()
    by_study = {s["study"]: s for s in report["studies"]}
    refused_study = refused[0].StudyInstanceUID
    assert by_study[refused_study]["status"] == "not-found"
    assert by_study[burned[0].StudyInstanceUID]["status"] == "withheld"
    assert sum(by_study[burned[0].StudyInstanceUID]["withheld"].values()) == 1
    assert report["totals"]["exported"] == len(permitted)
    exported = _read_folder(out_a)
    assert len(exported) == len(permitted)

    # every instance: pseudonymous patient, shifted dates (the FHIR offset of the patient), pixels intact
    keys_a = deid.keys_for(ANALYST, "default")
    offset = keys_a.date_offset_days(OK)
    src_by_uid = {keys_a.uid_for(d.SOPInstanceUID): d for d in permitted}
    out_uids = {d.SOPInstanceUID for d in exported}
    assert out_uids == set(src_by_uid)
    from mappings.deid.dates import shift_dicom_date

    resolved = 0
    for ds in exported:
        src = src_by_uid[ds.SOPInstanceUID]
        assert ds.PatientID == keys_a.pseudonym("Patient", OK) and ds.PatientIdentityRemoved == "YES"
        if src.get("StudyDate"):
            assert ds.StudyDate == shift_dicom_date(src.StudyDate, offset)
        if "PixelData" in src:
            assert hashlib.sha256(ds.PixelData).digest() == hashlib.sha256(src.PixelData).digest()
        if ds.Modality in ("SR", "SEG"):  # references point at exported instances
            src_refs = {r for r in _refs(src, set()) if r in {d.SOPInstanceUID for d in permitted}}
            assert {keys_a.uid_for(r) for r in src_refs} <= _refs(ds, set()) & out_uids
            resolved += len(src_refs)
    assert resolved >= 3

    # the clinician's export differs exactly by the refused patient's study
    out_c = tmp_path / "clinician"
    rep_c = (await svc.export(CLINICIAN, studies, ExportTarget(folder=out_c), project="default")).as_json()
    assert {s["study"]: s["status"] for s in rep_c["studies"]}[refused_study] == "exported"
    clin = pydicom.fileset.FileSet(out_c / "DICOMDIR")
    clin_uids = {inst.SOPInstanceUID for inst in clin}
    assert clin_uids - out_uids == {keys_a.uid_for(d.SOPInstanceUID) for d in refused}

    # deterministic per project, unrelated across projects
    again = (await svc.export(ANALYST, studies, ExportTarget(folder=tmp_path / "again"), project="default"))
    assert {inst.SOPInstanceUID for inst in FileSet(tmp_path / "again" / "DICOMDIR")} == out_uids
    other = await svc.export(ANALYST, studies, ExportTarget(folder=tmp_path / "other"), project="other")
    assert not {inst.SOPInstanceUID for inst in FileSet(tmp_path / "other" / "DICOMDIR")} & out_uids
    assert again.as_json()["totals"] == other.as_json()["totals"]

    # STOW-RS to a real DICOMweb server (Orthanc)
    with orthanc(tmp_path / "orthanc") as base:
        rep_s = await svc.export(ANALYST, studies, ExportTarget(stow_url=f"{base}/dicom-web"), project="default")
        assert rep_s.as_json()["totals"]["exported"] == len(permitted), rep_s.as_json()
        found = await asyncio.to_thread(lambda: requests.get(f"{base}/dicom-web/instances", timeout=30).json())
        assert {i["00080018"]["Value"][0] for i in found} == out_uids

    # no PHI in the reports or the logs
    text = json.dumps([report, rep_c, again.as_json()]) + stderr.getvalue() + caplog.text
    for s in PHI:
        assert s not in text, s


@pytest.fixture
async def deid_site(tmp_path, db_url):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    settings = make_settings(tmp_path / "data", db_url, deid_wado=True, deid_secret="wado-test-secret-0123456789",
                             extra={"consent": {"policy": str(policy), "disease_ontologies": [str(OBO)],
                                                "refresh_s": 0}})
    app = create_app(settings)
    app[keys.GATE] = ConsentGate(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Gateway(server, settings)
    finally:
        await server.close()


def _parts(body: bytes, ctype: str) -> list[bytes]:
    msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    return [p.get_payload(decode=True) for p in msg.get_payload()]


async def test_wado_answers_research_roles_deidentified(deid_site):
    gw = deid_site
    permitted, burned, refused = _datasets()
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        async with http.post(f"{gw.dicomweb}/studies", data=stow_body(permitted + burned + refused, BOUNDARY),
                             headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
        analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
        clinician = gw.headers("clinician")
        deid = gw.app[keys.DEID]
        k = deid.keys_for(ANALYST)
        ct = permitted[0]
        st = ct.StudyInstanceUID
        for who, headers in (("analyst", analyst), ("clinician", clinician)):
            async with http.get(f"{gw.dicomweb}/studies/{st}", headers=headers) as r:
                assert r.status == 200
                parts = _parts(await r.read(), r.headers["Content-Type"])
            sets = [pydicom.dcmread(io.BytesIO(p)) for p in parts]
            raw = b"".join(parts)
            if who == "analyst":
                for text in PHI:
                    assert text.encode() not in raw, text
                assert {d.PatientID for d in sets} == {k.pseudonym("Patient", OK)}
                assert {d.SOPInstanceUID for d in sets} == {k.uid_for(d.SOPInstanceUID) for d in permitted
                                                            if d.StudyInstanceUID == st}
                for d in sets:
                    src = next(s for s in permitted if k.uid_for(s.SOPInstanceUID) == d.SOPInstanceUID)
                    if "PixelData" in src:
                        assert d.PixelData == src.PixelData
            else:  # treatment: identified, as stored (the test can see PHI when it is there)
                assert b"Quartermaine" in raw
            async with http.get(f"{gw.dicomweb}/studies/{st}/metadata", headers=headers) as r:
                assert r.status == 200
                meta = await r.text()
            assert ("Quartermaine" in meta) == (who == "clinician")
            if who == "analyst":
                assert all(i["00120062"]["Value"] == ["YES"] for i in json.loads(meta))
        # withheld (burned-in) and refused instances are not there for the analyst, on every route
        b = burned[0]
        base = f"{gw.dicomweb}/studies/{b.StudyInstanceUID}/series/{b.SeriesInstanceUID}/instances/{b.SOPInstanceUID}"
        for url in (base, base + "/metadata", base + "/frames/1", base + "/rendered"):
            async with http.get(url, headers=analyst) as r:
                assert r.status == 404, url
            async with http.get(url, headers=clinician) as r:
                assert r.status == 200, url
        async with http.get(f"{gw.dicomweb}/studies/{refused[0].StudyInstanceUID}", headers=analyst) as r:
            assert r.status == 404


async def test_export_job_over_http_start_poll_and_bad_input(site):  # noqa: F811
    gw = site
    permitted, burned, refused = _datasets()
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        async with http.post(f"{gw.dicomweb}/studies", data=stow_body(permitted[:3] + refused, BOUNDARY),
                             headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
        analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}, subject="ana", attrs={"project": "p1"})
        studies = [permitted[0].StudyInstanceUID, refused[0].StudyInstanceUID]
        body = {"studies": studies, "target": {"folder": "cohort-1"}, "project": "p1"}
        async with http.post(f"{gw.url}/export/dicom", json=body, headers=analyst) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Content-Location"]
        for _ in range(600):  # (the job worker's poll, a loaded machine)
            async with http.get(gw.url + location, headers=analyst) as r:
                doc = await r.json()
                if r.status == 200:
                    break
                assert r.status == 202 and "X-Progress" in r.headers and r.headers["Retry-After"]
            await asyncio.sleep(0.05)
        assert doc["state"] == "completed", doc
        statuses = {s["study"]: s["status"] for s in doc["report"]["studies"]}
        assert statuses == {studies[0]: "exported", studies[1]: "not-found"}
        folder = gw.settings.data_dir / "exports" / "dicom" / "cohort-1"
        assert len(_read_folder(folder)) == 3
        # someone else's job is not there; bad requests are 400 problem+json, nothing started
        async with http.get(gw.url + location, headers=gw.headers("analyst", subject="other", purpose={"codes": ["DUO:0000042"]})) as r:
            assert r.status == 404
        # a withdrawn consent stops the next export
        withdrawn = consent(OK, ["DUO:0000042"], [], {"status": "inactive"})
        async with http.put(f"{gw.fhir}/Consent/{withdrawn['id']}", json=withdrawn,
                            headers=gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}) as r:
            assert r.status in (200, 201), await r.text()
        async with http.post(f"{gw.url}/export/dicom", json=body | {"target": {"folder": "cohort-2"}}, headers=analyst) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Content-Location"]
        for _ in range(600):  # (the job worker's poll, a loaded machine)
            async with http.get(gw.url + location, headers=analyst) as r:
                doc = await r.json()
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert {s["status"] for s in doc["report"]["studies"]} == {"not-found"}, doc
        async with http.post(f"{gw.url}/export/dicom", json=body | {"project": "someone-elses", "target": {"folder": "cohort-3"}}, headers=analyst) as r:
            assert r.status == 403
        for bad in ({}, {"studies": [], "target": {"folder": "x"}}, {"studies": ["1.2.3"], "target": {"folder": "../x"}},
                    {"studies": ["1.2.3"], "target": {"stow": "nowhere"}}, {"studies": ["1.2.3"], "target": {"folder": "cohort-1"}},
                    {"studies": ["not a uid!"], "target": {"folder": "y"}},
                    {"studies": ["1.2.3"], "target": {"folder": "z"}, "options": {"bogus": True}}):
            async with http.post(f"{gw.url}/export/dicom", json=bad, headers=analyst) as r:
                assert r.status == 400, (bad, r.status, await r.text())
                assert r.headers["Content-Type"].startswith("application/problem+json")


async def test_an_export_job_whose_server_died_resumes_in_the_next_one(tmp_path, db_url):
    """Server A exports the first studies of a job and dies (its lease left behind); server B, started on the
    same store, takes the job over when the lease expires and completes it: each study exactly once."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))

    def settings(worker: bool):
        return make_settings(tmp_path / "data", db_url, extra={
            "consent": {"policy": str(policy), "disease_ontologies": [str(OBO)], "refresh_s": 0},
            "export": {"lease_s": 1.0, "poll_s": 0.1, "worker": worker}})

    async def start(s) -> Gateway:
        app = create_app(s)
        app[keys.GATE] = ConsentGate(s)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return Gateway(server, s)

    studies = [ct_series(patient_id=OK, patient_name="Quartermaine^Zebulon", n=2, size=16) for _ in range(3)]
    uids = [s[0].StudyInstanceUID for s in studies]
    analyst = None
    a = await start(settings(worker=False))
    try:
        async with aiohttp.ClientSession() as http:
            await _load(a, http)
            async with http.post(f"{a.dicomweb}/studies", data=stow_body([d for s in studies for d in s], BOUNDARY),
                                 headers=a.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
                assert r.status == 200, await r.text()
            analyst = a.headers("analyst", purpose={"codes": ["DUO:0000042"]}, subject="ana")
            async with http.post(f"{a.url}/export/dicom", json={"studies": uids, "target": {"folder": "resumed"}},
                                 headers=analyst) as r:
                assert r.status == 202, await r.text()
                location = r.headers["Content-Location"]
        jobs = a.app[keys.DICOM_EXPORT_JOBS]
        updates = 0
        real_update = jobs.queue.update

        async def dying_update(*args, **kw):
            nonlocal updates
            done = await real_update(*args, **kw)
            updates += 1
            if updates == 2:  # two studies done and recorded
                raise SystemExit("server killed")  # stands in for the process dying mid-job
            return done

        jobs.queue.update = dying_update
        row = await jobs.queue.claim()
        with pytest.raises(SystemExit):
            await jobs.execute(row)
        job = await jobs.get(row.job_id)
        assert job["state"] == "running" and job["done"] == 2 and len(json.loads(job["cursor"])) == 2
    finally:
        await a.server.close()
    b = await start(settings(worker=True))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                async with http.get(b.url + location, headers=analyst) as r:
                    doc = await r.json()
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
        assert doc["state"] == "completed", doc
        assert [s["study"] for s in doc["report"]["studies"]] == uids
        assert {s["status"] for s in doc["report"]["studies"]} == {"exported"}
        exported = _read_folder(b.settings.data_dir / "exports" / "dicom" / "resumed")
        k = b.app[keys.DEID].keys_for(ANALYST)
        assert sorted(d.SOPInstanceUID for d in exported) == sorted(k.uid_for(d.SOPInstanceUID) for s in studies for d in s)
        assert (await b.app[keys.DICOM_EXPORT_JOBS].get(row.job_id))["attempts"] == 2
        assert not (b.settings.data_dir / "exports" / ".staging" / row.job_id).exists()
    finally:
        await b.server.close()


async def test_export_of_a_federation_cohort_takes_the_permitted_studies(site, tmp_path):  # noqa: F811
    """A cohort (the federation cohort language) instead of a list of studies, over HTTP and in the CLI: the
    studies holding permitted instances of the patients the gated cohort compiler selects."""
    gw = site
    permitted, burned, refused = _datasets()
    async with aiohttp.ClientSession() as http:
        await _load(gw, http)
        async with http.post(f"{gw.dicomweb}/studies", data=stow_body(permitted + burned + refused, BOUNDARY),
                             headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
        ok_studies = sorted({d.StudyInstanceUID for d in permitted + burned})
        svc = gw.app[keys.DICOM_EXPORT]
        assert await svc.cohort_studies(ANALYST, {"imaging": {"modality": "CT"}}) == ok_studies
        assert await svc.cohort_studies(CLINICIAN, {"imaging": {"modality": "CT"}}) == sorted(set(ok_studies) | {refused[0].StudyInstanceUID})
        assert await svc.cohort_studies(ANALYST, {"imaging": {"modality": "MR"}}) == []

        analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}, subject="ana")
        body = {"cohort": {"imaging": {"modality": "CT"}}, "target": {"folder": "by-cohort"}}
        async with http.post(f"{gw.url}/export/dicom", json=body, headers=analyst) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Content-Location"]
        for _ in range(600):
            async with http.get(gw.url + location, headers=analyst) as r:
                doc = await r.json()
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert doc["state"] == "completed" and doc["request"]["cohort"] is True, doc
        assert sorted(s["study"] for s in doc["report"]["studies"]) == ok_studies
        assert len(_read_folder(gw.settings.data_dir / "exports" / "dicom" / "by-cohort")) == len(permitted)
        for bad in ({"cohort": {"nonsense": 1}, "target": {"folder": "c2"}}, {"cohort": [], "target": {"folder": "c3"}},
                    {"cohort": {"imaging": {"modality": "CT"}}, "studies": ["1.2.3"], "target": {"folder": "c4"}}):
            async with http.post(f"{gw.url}/export/dicom", json=bad, headers=analyst) as r:
                assert r.status == 400, (bad, await r.text())

    cohort = tmp_path / "cohort.json"
    cohort.write_text(json.dumps({"cohort": {"imaging": {"modality": "CT"}}}))
    toml = tmp_path / "site.toml"
    consent = gw.settings.extra["consent"]
    toml.write_text(f'[consent]\npolicy = "{consent["policy"]}"\ndisease_ontologies = ["{consent["disease_ontologies"][0]}"]\n')
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = await asyncio.to_thread(cli_main, [
            "export", "dicom", "--cohort", str(cohort), "--out", str(tmp_path / "cli"), "--purpose", "DUO:0000042",
            "--config", str(toml), "--data-dir", str(gw.settings.data_dir),
            "--database-url", gw.settings.effective_database_url, "--no-progress"])
    assert rc == 0, stderr.getvalue()
    assert sorted(s["study"] for s in json.loads(stdout.getvalue())["studies"]) == ok_studies


async def test_kill9_of_the_server_mid_job_then_a_restart_completes_the_export(tmp_path, db_url):
    """A real ``fedgate serve`` process killed (SIGKILL) while it runs an export job; started again on the same
    store, it takes the job over when the lease expires: every study exported once, in one File-set."""
    import os
    import signal

    from tests.integration.federation_fixtures import start_gateway_process

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    toml = (f'[consent]\npolicy = "{policy}"\ndisease_ontologies = ["{OBO}"]\nrefresh_s = 0\n'
            '[export]\nlease_s = 2.0\npoll_s = 0.1\n')
    studies = [ct_series(patient_id=OK, patient_name="Quartermaine^Zebulon", n=4, size=128) for _ in range(16)]
    uids = [s[0].StudyInstanceUID for s in studies]
    gw = await start_gateway_process(tmp_path, "dx9", toml, db_url=db_url, args=("--processes", "1"))
    try:
        async with aiohttp.ClientSession() as http:
            await _load(gw, http)
            async with http.post(f"{gw.dicomweb}/studies", data=stow_body([d for s in studies for d in s], BOUNDARY),
                                 headers=gw.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
                assert r.status == 200, await r.text()
            analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}, subject="ana")
            async with http.post(f"{gw.url}/export/dicom", json={"studies": uids, "target": {"folder": "k9"}},
                                 headers=analyst) as r:
                assert r.status == 202, await r.text()
                location = r.headers["Content-Location"]
            for _ in range(2000):
                async with http.get(gw.url + location, headers=analyst) as r:
                    doc = await r.json()
                if doc["progress"]["studies"] >= 2:
                    break
                await asyncio.sleep(0.02)
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
        assert doc["state"] == "running" and doc["progress"]["studies"] < len(uids), doc  # killed mid-job
    finally:
        gw.stop()
    gw = await start_gateway_process(tmp_path, "dx9", toml, db_url=db_url, args=("--processes", "1"))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(1200):
                async with http.get(gw.url + location, headers=analyst) as r:
                    doc = await r.json()
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
        assert doc["state"] == "completed", doc
        assert [s["study"] for s in doc["report"]["studies"]] == uids
        assert {s["status"] for s in doc["report"]["studies"]} == {"exported"}
        assert len(_read_folder(gw.settings.data_dir / "exports" / "dicom" / "k9")) == 4 * len(uids)
    finally:
        gw.stop()
