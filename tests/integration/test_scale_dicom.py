"""bench/scale.py's DICOM half at a tiny size, both engines, so it cannot rot (issue 27).

Four FHIR patients (200 resources, the FHIR half's loader), then ``scale_dicom.run`` at 30 and 80 instances
(seed 29: a cardiac MR study with its SR and a series cut between the two sizes, an MR head study): every
instance stored through STOW-RS over HTTP, and the clinician's QIDO-RS match counts equal to what the
generated plan holds at each size (the PatientID, date-range, modality and series-level searches, the
instances of the longest series); WADO-RS series, /metadata and the federation cohort count answered.
The spliced instances of the generator (one pydicom-written file per series, the rest patched) read back
with their own UIDs, numbers, positions and pixels.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import pydicom

from bench.scale import load
from bench.scale_dicom import SOP_BASE, demographics, image_series, plan, run
from tests.conftest import make_settings, start_gateway


def expected(studies, label: str) -> int | None:
    series = [se for st in studies for se in st.series]
    if label.startswith("studies?PatientID=MRN"):
        return sum(st.patient == int(label.rsplit("MRN", 1)[1]) for st in studies)
    if label == "studies?StudyDate=20180101-20191231":
        return sum("20180101" <= st.date <= "20191231" for st in studies)
    if label == "studies?ModalitiesInStudy=MR":
        return sum(any(se.modality == "MR" for se in st.series) for st in studies)
    if label == "series?Modality=CT":
        return sum(se.modality == "CT" for se in series)
    if label == "series?Modality=MR&BodyPartExamined=HEART":
        return sum(se.modality == "MR" and se.body_part == "HEART" for se in series)
    if label.startswith("studies/{study}/series?Modality="):
        wide = max(studies, key=lambda st: (len(st.series), st.instances))
        return sum(se.modality == label.rsplit("=", 1)[1] for se in wide.series)
    if label.startswith("studies/{study}/series/{series}/instances"):
        return max(se.n for se in series)
    return None


async def test_scale_dicom_half_tiny(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)  # (SQLite: fedgate.db in the data folder, where db_size looks)
    gw = await start_gateway(settings)
    try:
        n = await load(gw.app, 200, [])
        args = argparse.Namespace(dicom_instances="30,80", dicom_size=8, stow_concurrency=2, stow_batch=10,
                                  dicom_seed=29, rounds=1)
        lines, measured = await run(gw.app, gw.url, settings, settings.data_dir, args, n)
    finally:
        await gw.server.close()
    assert [m["stage"]["sent"] for m in measured] == [30, 50]
    assert lines[0] == "### DICOM: 30 instances (1 studies)" and "### DICOM: 80 instances (2 studies)" in lines
    for m in measured:
        kinds = {st.kind for st in m["studies"]}
        checked = 0
        for label, _level, arm, total, _first, _offset, _deep in m["qido"]:
            want = expected(m["studies"], label)
            if arm == "treatment" and want is not None:
                assert total == want, (label, total, want)
                checked += 1
        assert checked == 7
        assert m["wado"]["inst_s"] > 0 and m["wado"]["requests"] > 0
        assert "count" in m["cohort"] and m["db_growth"] > 0
    assert kinds == {"cardiac", "head"}


def test_spliced_series_reads_back():
    studies = plan([400], 4, 29)
    study, se = next((st, se) for st in studies for se in st.series if se.modality == "MR" and se.n > 5)
    pixels = np.random.default_rng(5).normal(1000, 50, (se.n, 8, 8)).astype(np.int16)
    raws = image_series(study, se, demographics(study.patient), pixels)
    assert len(raws) == se.n
    for k, raw in enumerate(raws, start=1):
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == f"{se.uid}.{SOP_BASE + k}"
        assert (ds.InstanceNumber, ds.SeriesInstanceUID, ds.StudyInstanceUID) == (k, se.uid, study.uid)
        assert [float(x) for x in ds.ImagePositionPatient] == [0, 0, (k - 1) * se.thickness]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.PatientID == demographics(study.patient)["mrn"]
        assert (ds.pixel_array == pixels[k - 1]).all()
