"""Inference end to end through the running gateway: STOW a CT series → job (on request or auto-trigger) →
SR (TID 1500) and SEG retrievable via WADO-RS and valid by highdicom, found by QIDO; FHIR DiagnosticReport +
Observations linked to the ImagingStudy; jobs persisted with states, resumed after a restart exactly once."""

from __future__ import annotations

import asyncio
import io
import time

import highdicom as hd
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import update

from gateway.store.jobs_schema import inf_job
from inference.train_synthetic import synth_slice
from tests.conftest import make_settings, start_gateway
from tests.dicom_synth import ct_series

LESION_SLICES = (1, 3)


def lesion_series(n: int = 5, seed: int = 3):
    """A CT series whose pixel data carries the synthetic lesion on LESION_SLICES; returns (datasets, masks)."""
    rng = np.random.default_rng(seed)
    dss = ct_series(patient_id="INF-1", patient_name="Model^Test", n=n)
    frame = generate_uid()
    masks = []
    for i, ds in enumerate(dss):
        hu, mask = synth_slice(rng, i in LESION_SLICES)
        ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()  # RescaleIntercept -1024
        ds.FrameOfReferenceUID = frame
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        masks.append(mask)
    return dss, np.stack(masks)


@pytest.fixture
async def session():
    """A client session of its own: the conftest ``http`` fixture would start a second gateway (and job
    worker) on the same store."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        yield s


def _settings(tmp_path, db_url, **inf):
    return make_settings(tmp_path / "data", db_url, extra={"inference": {"poll_s": 0.2, **inf}})


async def _wait_job(session, gw, job_id: str, states=("succeeded", "failed"), timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(f"{gw.url}/inference/jobs/{job_id}", headers=gw.headers("admin")) as r:
            assert r.status == 200
            job = await r.json()
        if job["state"] in states:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")


async def _stow(gw, dss) -> None:
    client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs"))
    await asyncio.to_thread(client.store_instances, dss)


async def test_models_listed_and_card_validation(tmp_path, db_url, session):
    gw = await start_gateway(_settings(tmp_path, db_url))
    try:
        async with session.get(f"{gw.url}/inference/models", headers=gw.headers("clinician")) as r:
            assert r.status == 200
            names = sorted(m["card"]["name"] for m in (await r.json())["models"])
        assert names == ["ct-lesion-classifier", "ct-lesion-segmenter"]
        from inference.cards import shipped_cards

        card = dict(shipped_cards()[0].raw)
        bad = {**card, "version": "2.0.0", "selector": {**card["selector"], "min_slices": "many"}}
        async with session.post(f"{gw.url}/inference/models", json=bad, headers=gw.headers("admin")) as r:
            assert r.status == 422 and r.content_type == "application/problem+json"
            assert "selector.min_slices" in (await r.json())["detail"]
        missing = {**card, "version": "2.0.0", "triton": {"model": "no_such_model"}}
        async with session.post(f"{gw.url}/inference/models", json=missing, headers=gw.headers("admin")) as r:
            assert r.status == 422 and "triton.model" in (await r.json())["detail"]
        good = {**card, "version": "2.0.0"}
        async with session.post(f"{gw.url}/inference/models", json=good, headers=gw.headers("clinician")) as r:
            assert r.status == 403
        async with session.post(f"{gw.url}/inference/models", json=good, headers=gw.headers("admin")) as r:
            assert r.status == 201
        async with session.post(f"{gw.url}/inference/models", json=good, headers=gw.headers("admin")) as r:
            assert r.status == 200
        async with session.post(f"{gw.url}/inference/models", json={**good, "description": "changed"},
                             headers=gw.headers("admin")) as r:
            assert r.status == 409
    finally:
        await gw.server.close()


async def test_job_on_request_sr_seg_fhir(tmp_path, db_url, session):
    gw = await start_gateway(_settings(tmp_path, db_url))
    try:
        dss, masks = lesion_series()
        study, series = dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID
        await _stow(gw, dss)
        body = {"model": "ct-lesion-segmenter", "study": study, "series": series}
        # a research purpose may not run a clinical-care model
        async with session.post(f"{gw.url}/inference/jobs", json=body,
                             headers=gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})) as r:
            assert r.status == 403
        async with session.post(f"{gw.url}/inference/jobs", json={**body, "study": "1.2.3"},
                             headers=gw.headers("clinician")) as r:
            assert r.status == 404
        async with session.post(f"{gw.url}/inference/jobs", json={"model": 5, "study": study},
                             headers=gw.headers("clinician")) as r:
            assert r.status == 400 and "model" in (await r.json())["detail"]
        async with session.post(f"{gw.url}/inference/jobs", json=body, headers=gw.headers("clinician")) as r:
            assert r.status == 202
            [job] = (await r.json())["jobs"]
        async with session.post(f"{gw.url}/inference/jobs", json=body, headers=gw.headers("clinician")) as r:
            assert r.status == 200 and (await r.json())["jobs"][0]["id"] == job["id"]  # no duplicate
        job = await _wait_job(session, gw, job["id"])
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1
        [finding] = job["result"]["findings"]
        assert finding["positive"] and finding["slices"] == list(LESION_SLICES)

        client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("clinician"))
        found = await asyncio.to_thread(client.search_for_series, study)
        mods = sorted(s["00080060"]["Value"][0] for s in found)
        assert mods == ["CT", "SEG", "SR"]
        seg_ref, sr_ref = job["result"]["dicom"]["seg"], job["result"]["dicom"]["sr"]
        seg_ds = await asyncio.to_thread(client.retrieve_instance, study, seg_ref["series"], seg_ref["sop"])
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        src_uids = [d.SOPInstanceUID for d in dss]
        pix = seg.get_pixels_by_source_instance(source_sop_instance_uids=src_uids, segment_numbers=[1])[..., 0]
        inter = (pix.astype(bool) & masks.astype(bool)).sum()
        dice = 2 * inter / (pix.astype(bool).sum() + masks.astype(bool).sum())
        assert dice > 0.7, dice
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
        sr_ds = await asyncio.to_thread(client.retrieve_instance, study, sr_ref["series"], sr_ref["sop"])
        buf = io.BytesIO()
        sr_ds.save_as(buf)
        sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(buf.getvalue())))
        [group] = sr.content.get_image_measurement_groups()
        refs = {img.referenced_sop_instance_uid for img in group.source_images}
        assert refs == {src_uids[i] for i in LESION_SLICES}
        assert group.get_qualitative_evaluations()[0].value.value == "52101004"  # Present
        # FHIR: DiagnosticReport + Observation linked to the ImagingStudy
        rid = job["result"]["fhir"]["DiagnosticReport"]
        async with session.get(f"{gw.fhir}/DiagnosticReport/{rid}", headers=gw.headers("clinician")) as r:
            assert r.status == 200
            report = await r.json()
        assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study}"}]
        assert "ct-lesion-segmenter 1.0.0" in report["code"]["text"]
        obs_id = report["result"][0]["reference"].split("/")[1]
        async with session.get(f"{gw.fhir}/Observation/{obs_id}", headers=gw.headers("clinician")) as r:
            assert r.status == 200 and (await r.json())["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    finally:
        await gw.server.close()


async def test_auto_trigger_and_restart_exactly_once(tmp_path, db_url, session):
    settings = _settings(tmp_path, db_url, auto_trigger=True, settle_s=0.3, lease_s=2.0)
    gw = await start_gateway(settings)
    try:
        dss, _ = lesion_series(n=4)
        study = dss[0].StudyInstanceUID
        await _stow(gw, dss)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with session.get(f"{gw.url}/inference/jobs", params={"study": study}, headers=gw.headers("admin")) as r:
                jobs = (await r.json())["jobs"]
            if len(jobs) == 2:
                break
            await asyncio.sleep(0.2)
        assert sorted(j["model"]["name"] for j in jobs) == ["ct-lesion-classifier", "ct-lesion-segmenter"]
        assert {j["trigger"] for j in jobs} == {"auto"}
        done = [await _wait_job(session, gw, j["id"]) for j in jobs]
        assert [j["state"] for j in done] == ["succeeded", "succeeded"]
        cls = next(j for j in done if j["model"]["name"] == "ct-lesion-classifier")
        assert cls["result"]["findings"][0]["slices"] == [i for i in LESION_SLICES if i < 4]
        # the worker "crashes" mid-job: the job is left running under a dead lease
        async with _db(gw).write() as conn:
            await conn.execute(update(inf_job).where(inf_job.c.job_id == cls["id"]).values(
                state="running", lease_owner="dead-worker", lease_until=time.time() + 1.0, result=None))
    finally:
        await gw.server.close()
    gw = await start_gateway(settings)  # restart on the same store
    try:
        job = await _wait_job(session, gw, cls["id"], timeout=60)
        assert job["state"] == "succeeded" and job["attempts"] == 2
        client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("clinician"))
        found = await asyncio.to_thread(client.search_for_series, study)
        mods = sorted(s["00080060"]["Value"][0] for s in found)
        assert mods == ["CT", "SEG", "SR", "SR"]  # one SR per model, one SEG: nothing duplicated by the re-run
        sr_series = [s for s in found if s["00080060"]["Value"][0] == "SR"]
        assert all(s["00201209"]["Value"][0] == 1 for s in sr_series)  # one instance each
    finally:
        await gw.server.close()


def _db(gw):
    from gateway import keys

    return gw.app[keys.DB]


async def test_triton_backend_server_down_job_waits_then_succeeds(tmp_path, db_url, session):
    """The gateway dispatches to MLServer (KServe v2 over gRPC) that is down when the job starts: the job is
    re-queued with back-off (attempts grow) and succeeds once the server is up; MLServer saw exactly the
    series' instances."""
    from inference.repository import DEFAULT_REPOSITORY
    from tests.mlserver import MLServer

    record = tmp_path / "received.jsonl"
    srv = MLServer(tmp_path / "mls", DEFAULT_REPOSITORY, ["ct_lesion_classifier"], record=record)
    settings = _settings(tmp_path, db_url, url=srv.grpc_url, protocol="grpc", retry_attempts=2, timeout_s=10,
                         requeue_base_s=0.2, requeue_max_s=1.0)
    gw = await start_gateway(settings)
    try:
        dss, _ = lesion_series(n=3)
        await _stow(gw, dss)
        body = {"model": "ct-lesion-classifier", "study": dss[0].StudyInstanceUID}
        async with session.post(f"{gw.url}/inference/jobs", json=body, headers=gw.headers("clinician")) as r:
            assert r.status == 202
            [job] = (await r.json())["jobs"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async with session.get(f"{gw.url}/inference/jobs/{job['id']}", headers=gw.headers("admin")) as r:
                job = await r.json()
            if job["attempts"] >= 2:
                break
            await asyncio.sleep(0.2)
        assert job["state"] in ("queued", "running") and job["attempts"] >= 2, job
        assert "unavailable" in (job["error"] or "")
        await asyncio.to_thread(srv.start)
        job = await _wait_job(session, gw, job["id"], timeout=120)
        assert job["state"] == "succeeded", job
        assert job["result"]["findings"][0]["slices"] == [i for i in LESION_SLICES if i < 3]
    finally:
        await gw.server.close()
        srv.stop()
    import hashlib
    import json as _json

    from inference.preprocess import prepare_series
    from inference.cards import shipped_cards

    card = next(c for c in shipped_cards() if c.name == "ct-lesion-classifier")
    x = prepare_series([(d.pixel_array, float(d.RescaleSlope), float(d.RescaleIntercept)) for d in dss], card.preprocess)
    want = [hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in x]
    got = [h for line in record.read_text().splitlines() for h in _json.loads(line)["sha256"]]
    assert got == want


async def test_cli_model_register_list(tmp_path, capsys):
    import json as _json

    from gateway.cli import main

    card = _json.loads(open("inference/cards/ct_lesion_classifier.json").read())
    (tmp_path / "ok.json").write_text(_json.dumps({**card, "version": "9.0.0"}))
    (tmp_path / "bad.json").write_text(_json.dumps({**card, "version": "9.0.1", "purpose": "fun"}))
    common = ["--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"]
    assert await asyncio.to_thread(main, ["model", "register", str(tmp_path / "ok.json"), *common]) == 0
    assert await asyncio.to_thread(main, ["model", "register", str(tmp_path / "bad.json"), *common]) == 1
    assert "purpose" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["model", "list", "--json", *common]) == 0
    listed = {(c["card"]["name"], c["card"]["version"]) for c in _json.loads(capsys.readouterr().out)}
    assert ("ct-lesion-classifier", "9.0.0") in listed and ("ct-lesion-classifier", "1.0.0") in listed


async def test_research_job_sends_only_consented_series(tmp_path, db_url, session):
    """A research-purpose job reaches only series of patients whose consent permits the purpose; after a
    withdrawal a queued job sends nothing. Asserted on what MLServer received."""
    import hashlib
    import json as _json

    from gateway import keys
    from inference.cards import shipped_cards
    from inference.preprocess import prepare_series
    from inference.repository import DEFAULT_REPOSITORY
    from tests.integration.test_consent_enforcement import consent, patient
    from tests.mlserver import MLServer

    record = tmp_path / "received.jsonl"
    srv = MLServer(tmp_path / "mls", DEFAULT_REPOSITORY, ["ct_lesion_classifier"], record=record).start()
    gw = await start_gateway(_settings(tmp_path, db_url, url=srv.grpc_url, protocol="grpc", worker=False))
    try:
        fj = {"Content-Type": "application/fhir+json"}
        for pid in ("p-gru", "p-none"):
            async with session.put(f"{gw.fhir}/Patient/{pid}", json=patient(pid), headers={**gw.headers(), **fj}) as r:
                assert r.status in (200, 201), await r.text()
        async with session.put(f"{gw.fhir}/Consent/c-p-gru", json=consent("p-gru", ["DUO:0000042"], [], {}),
                             headers={**gw.headers(), **fj}) as r:
            assert r.status in (200, 201), await r.text()
        card = dict(next(c for c in shipped_cards() if c.name == "ct-lesion-classifier").raw)
        card.update(name="ct-lesion-research", purpose="DUO:0000042", auto_trigger=False, encodings=["sr"])
        async with session.post(f"{gw.url}/inference/models", json=card, headers=gw.headers("admin")) as r:
            assert r.status == 201, await r.text()
        series = {}
        for pid in ("p-gru", "p-none"):
            dss = ct_series(patient_id=pid, patient_name=f"Pat^{pid}", n=3, issuer=None)
            await _stow(gw, dss)
            series[pid] = dss
        gru = {"codes": ["DUO:0000042"]}
        h1 = gw.headers("analyst", purpose=gru, subject="analyst-1")
        h2 = gw.headers("analyst", purpose=gru, subject="analyst-2")
        body = {"model": "ct-lesion-research"}
        async with session.post(f"{gw.url}/inference/jobs", json={**body, "study": series["p-none"][0].StudyInstanceUID},
                             headers=h1) as r:
            assert r.status == 404  # the non-consented study is invisible under the research purpose
        async with session.post(f"{gw.url}/inference/jobs", json={**body, "study": series["p-gru"][0].StudyInstanceUID},
                             headers=gw.headers("clinician")) as r:
            assert r.status == 403  # a research model needs its research purpose
        jobs = []
        for h in (h1, h2):
            async with session.post(f"{gw.url}/inference/jobs",
                                 json={**body, "study": series["p-gru"][0].StudyInstanceUID}, headers=h) as r:
                assert r.status == 202
                jobs.append((await r.json())["jobs"][0]["id"])
        svc = gw.app[keys.INFERENCE]
        assert await svc.run_once()
        async with session.delete(f"{gw.fhir}/Consent/c-p-gru", headers=gw.headers()) as r:
            assert r.status in (200, 204)
        assert await svc.run_once()
        j1 = await _wait_job(session, gw, jobs[0], timeout=5)
        j2 = await _wait_job(session, gw, jobs[1], timeout=5)
        assert j1["state"] == "succeeded", j1
        assert j2["state"] == "failed" and "no instance is visible" in j2["error"], j2
    finally:
        await gw.server.close()
        srv.stop()
    c = next(c for c in shipped_cards() if c.name == "ct-lesion-classifier")

    def hashes(dss):
        x = prepare_series([(d.pixel_array, float(d.RescaleSlope), float(d.RescaleIntercept)) for d in dss],
                           c.preprocess)
        return [hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in x]

    got = [h for line in record.read_text().splitlines() for h in _json.loads(line)["sha256"]]
    assert got == hashes(series["p-gru"])  # once (job 1), nothing of p-none, nothing after the withdrawal
    assert not set(got) & set(hashes(series["p-none"]))


async def test_results_pushed_to_pacs(tmp_path, db_url, session):
    """Optional STOW-RS push of SR/SEG to a PACS (here a second fedgate acting as the PACS)."""
    pacs = await start_gateway(make_settings(tmp_path / "pacs", f"sqlite:///{tmp_path / 'pacs.db'}",
                                             extra={"inference": {"worker": False}}))
    gw = await start_gateway(_settings(tmp_path, db_url, push_url=pacs.dicomweb, push_token=pacs.token("pacs")))
    try:
        dss, _ = lesion_series(n=3)
        await _stow(gw, dss)
        body = {"model": "ct-lesion-segmenter", "study": dss[0].StudyInstanceUID}
        async with session.post(f"{gw.url}/inference/jobs", json=body, headers=gw.headers("clinician")) as r:
            [job] = (await r.json())["jobs"]
        job = await _wait_job(session, gw, job["id"])
        assert job["state"] == "succeeded" and job["result"]["push"] == "stored", job
        client = DICOMwebClient(url=pacs.dicomweb, headers=pacs.headers("clinician"))
        found = await asyncio.to_thread(client.search_for_series, dss[0].StudyInstanceUID)
        assert sorted(s["00080060"]["Value"][0] for s in found) == ["SEG", "SR"]
        sops = {s["00080018"]["Value"][0] for s in await asyncio.to_thread(
            client.search_for_instances, dss[0].StudyInstanceUID)}
        assert sops == {job["result"]["dicom"]["sr"]["sop"], job["result"]["dicom"]["seg"]["sop"]}
    finally:
        await gw.server.close()
        await pacs.server.close()
