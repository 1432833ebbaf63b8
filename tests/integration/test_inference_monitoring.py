"""Issue 6 monitoring: per model version, output and input distributions by scanner with a PSI drift
statistic and alerts, running performance once ground truth arrives (reference-standard FHIR
Observations), and energy per inference — all through the running gateway. Expected values are computed
here from the job results with this file's own formulas."""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from inference.train_synthetic import synth_slice
from tests.conftest import make_settings, start_gateway
from tests.dicom_synth import ct_series

MODEL = "ct-lesion-classifier"
TAG = {"system": "https://fedgate.dev/fhir/CodeSystem/tags", "code": "reference-standard"}


def _series(i: int, lesion: bool, manufacturer: str, shift: float, sex: str):
    rng = np.random.default_rng(100 + i)
    dss = ct_series(patient_id=f"MON-{i}", patient_name=f"Monitor^{i}", n=3, manufacturer=manufacturer, sex=sex,
                    birth_date="19600101" if i % 2 else "19900101")
    frame = generate_uid()
    for k, ds in enumerate(dss):
        hu, _ = synth_slice(rng, lesion and k == 1)
        ds.PixelData = np.round(hu + shift + 1024).astype(np.int16).tobytes()
        ds.FrameOfReferenceUID = frame
    return dss


def _psi(a: list[float], b: list[float], bins: int = 10) -> float:
    lo, hi = min(a + b), max(a + b)
    w = (hi - lo) / bins

    def share(v):
        c = [0] * bins
        for x in v:
            c[min(bins - 1, int((x - lo) / w))] += 1
        return [max(n / len(v), 1e-4) for n in c]
    p, q = share(a), share(b)
    return sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q))


def _auroc(labels: list[bool], scores: list[float]) -> float:
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


async def _run(session, gw, dss) -> dict:
    await asyncio.to_thread(DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs")).store_instances, dss)
    body = {"model": MODEL, "study": str(dss[0].StudyInstanceUID), "series": str(dss[0].SeriesInstanceUID)}
    async with session.post(f"{gw.url}/inference/jobs", json=body, headers=gw.headers("clinician")) as r:
        assert r.status == 202, await r.text()
        [job] = (await r.json())["jobs"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        async with session.get(f"{gw.url}/inference/jobs/{job['id']}", headers=gw.headers("admin")) as r:
            job = await r.json()
        if job["state"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.2)
    assert job["state"] == "succeeded", job
    return job


async def test_drift_performance_energy(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url,
                                           extra={"inference": {"poll_s": 0.2, "cpu_watts": 10.0}}))
    try:
        async with aiohttp.ClientSession() as session:
            plan = [(i, i % 2 == 0, "ACME", 0.0, "F" if i < 2 else "M") for i in range(4)]
            ref_jobs = [await _run(session, gw, _series(*p)) for p in plan]
            since = time.time()
            await asyncio.sleep(0.05)
            plan2 = [(i, i % 2 == 0, "Globex", 350.0, "F" if i < 6 else "M") for i in range(4, 8)]
            cur_jobs = [await _run(session, gw, _series(*p)) for p in plan2]
            truth = {j["study"]: lesion for j, (_, lesion, *_rest) in zip(ref_jobs + cur_jobs, plan + plan2)}
            # ground truth arrives later as reference-standard Observations pointing at the ImagingStudy
            for study, lesion in truth.items():
                obs = {"resourceType": "Observation", "status": "final", "meta": {"tag": [TAG]},
                       "code": {"coding": [{"system": "http://snomed.info/sct", "code": "52988006"}]},
                       "derivedFrom": [{"reference": f"ImagingStudy/{study}"}], "valueBoolean": lesion}
                async with session.post(f"{gw.fhir}/Observation", json=obs,
                                        headers=gw.headers("clinician") | {"Content-Type": "application/fhir+json"}) as r:
                    assert r.status == 201, await r.text()
            async with session.get(f"{gw.url}/inference/monitoring", params={"model": MODEL},
                                   headers=gw.headers("clinician")) as r:
                assert r.status == 403
            async with session.get(f"{gw.url}/inference/monitoring", params={"model": MODEL, "since": str(since)},
                                   headers=gw.headers("admin")) as r:
                assert r.status == 200, await r.text()
                report = await r.json()
    finally:
        await gw.server.close()

    score = {j["study"]: j["result"]["findings"][0]["score"] for j in ref_jobs + cur_jobs}
    inp = {j["study"]: j["result"]["monitoring"]["input_mean"] for j in ref_jobs + cur_jobs}
    ref_studies, cur_studies = [j["study"] for j in ref_jobs], [j["study"] for j in cur_jobs]
    assert report["inferences"] == 8 and report["window"] == {"since": since, "reference": 4, "current": 4}
    expected_psi = _psi([inp[s] for s in ref_studies], [inp[s] for s in cur_studies])
    got = report["drift"]["by_manufacturer"]["Globex"]["drift"]["input_mean"]["psi"]
    assert got == pytest.approx(expected_psi, abs=1e-3)
    assert expected_psi > 0.2  # the brighter scanner drifts
    assert {"scope": "manufacturer=Globex", "metric": "input_mean"}.items() <= next(
        a for a in report["alerts"] if a["metric"] == "input_mean").items()
    assert report["drift"]["overall"]["score"]["psi"] == pytest.approx(
        _psi([score[s] for s in ref_studies], [score[s] for s in cur_studies]), abs=1e-3)
    labels = [truth[s] for s in score]
    perf = report["performance"]["overall"]
    assert perf["n"] == 8 and perf["positives"] == sum(labels)
    assert perf["auroc"] == pytest.approx(_auroc(labels, [score[s] for s in score]), abs=1e-4)
    sens = sum(1 for s in score if truth[s] and score[s] >= 0.5) / sum(labels)
    assert perf["sensitivity"] == pytest.approx(sens)
    assert set(report["performance"]["manufacturer"]) == {"ACME", "Globex"}
    assert set(report["performance"]["sex"]) == {"female", "male"}
    energy = [j["result"]["monitoring"]["energy_j"] for j in ref_jobs + cur_jobs]
    assert report["energy"]["total_j"] == pytest.approx(sum(energy), abs=1e-5)
    assert all(e == pytest.approx(j["result"]["monitoring"]["cpu_s"] * 10.0, abs=1e-5)
               for e, j in zip(energy, ref_jobs + cur_jobs))


async def test_jobs_for_a_cohort_definition(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, extra={"inference": {"poll_s": 0.2}}))
    try:
        async with aiohttp.ClientSession() as session:
            women = [_series(20 + i, i == 0, "ACME", 0.0, "F") for i in range(2)]
            men = [_series(30, True, "ACME", 0.0, "M")]
            for dss in women + men:
                await asyncio.to_thread(DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs")).store_instances, dss)
            h = gw.headers("clinician")
            async with session.post(f"{gw.url}/inference/jobs", headers=h,
                                    json={"model": MODEL, "cohort": {"sex": "female"}}) as r:
                assert r.status == 202, await r.text()
                jobs = (await r.json())["jobs"]
            assert sorted(j["series"] for j in jobs) == sorted(str(d[0].SeriesInstanceUID) for d in women)
            async with session.post(f"{gw.url}/inference/jobs", headers=h,
                                    json={"model": MODEL, "cohort": {"sex": "female"}}) as r:
                assert r.status == 200  # the same request again: the same jobs, none new
            async with session.post(f"{gw.url}/inference/jobs", headers=h,
                                    json={"model": MODEL, "cohort": {"age": {"min": "old"}}}) as r:
                assert r.status == 400 and "$.cohort.age" in (await r.json())["detail"]
    finally:
        await gw.server.close()
