"""STOW's ParseFeed (gateway/services/dicomweb.py): parts handed over while a request is still arriving are all
parsed, in order, whatever the timing of arrivals and worker completions (a part must never go missing)."""

from __future__ import annotations

import asyncio
import io
import random

import pytest

from gateway.services.dicomweb import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, ParseFeed, Part
from gateway.services.workers import WorkerPool
from tests.dicom_synth import ct_series


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feed")
    out = []
    for i, ds in enumerate(ct_series(patient_id="FEED", patient_name="Feed^Test", n=12, size=16)):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = folder / f"{i}.dcm"
        path.write_bytes(buf.getvalue())
        out.append((path, str(ds.SOPInstanceUID)))
    return out


@pytest.mark.parametrize("seed", range(12))
async def test_every_part_is_parsed_in_order(files, seed):
    rng = random.Random(seed)
    feed = ParseFeed(WorkerPool(0), None)  # 0 workers: parsed in a thread, so timings vary
    expected = []
    for path, sop in files:
        if rng.random() < 0.15:
            feed.add(Part(None, failure=OUT_OF_RESOURCES, reason="too big"))
            expected.append(None)
        feed.add(Part(path, path.stat().st_size))
        expected.append(sop)
        if rng.random() < 0.5:
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.005]))
    if rng.random() < 0.5:
        await asyncio.sleep(rng.choice([0, 0.002, 0.02]))
    outcomes, errors = await feed.results()
    assert not errors
    assert [o.sop_uid for o in outcomes] == expected
    assert all((o.failure is None) == (sop is not None) for o, sop in zip(outcomes, expected))


async def test_unreadable_part_fails_alone(files, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not DICOM at all" * 20)
    feed = ParseFeed(WorkerPool(0), None)
    feed.add(Part(files[0][0], files[0][0].stat().st_size))
    feed.add(Part(bad, bad.stat().st_size))
    outcomes, _ = await feed.results()
    assert outcomes[0].failure is None and outcomes[1].failure == CANNOT_UNDERSTAND
