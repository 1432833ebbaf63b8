"""STOW's ParseFeed (gateway/services/dicom_ingest.py): parts handed over while a request is still arriving are all
parsed, in order, whatever the timing of arrivals and worker completions (a part must never go missing)."""

from __future__ import annotations

import asyncio
import io
import random

import pytest

from gateway.services.dicom_ingest import ParseFeed
from gateway.services.dicom_parse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Part
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


@pytest.mark.parametrize("seed", range(6))
async def test_parts_wait_for_their_write(files, seed):
    """Parts whose files are still being written (the receive path does not wait for its writer thread) are
    parsed once written, whatever order the writes complete in; a failed write fails that part alone (0xA700)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    feed = ParseFeed(WorkerPool(0), None)
    writes, expected = [], []
    for n, (path, sop) in enumerate(files):
        written = loop.create_future()
        feed.add(Part(path, path.stat().st_size), written, None)
        fail = n == 3
        writes.append((written, fail))
        expected.append(OUT_OF_RESOURCES if fail else None)
    order = list(range(len(writes)))
    rng.shuffle(order)
    for i in order:
        written, fail = writes[i]
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice([0, 0.001]))
        written.set_exception(OSError(28, "No space left on device")) if fail else written.set_result(None)
    outcomes, errors = await feed.results()
    assert not errors
    assert [o.failure for o in outcomes] == expected
    assert outcomes[3].reason == "the instance could not be stored: No space left on device"  # the OS's words
    assert [o.sop_uid for o, f in zip(outcomes, expected) if f is None] == [s for (_, s), f in zip(files, expected) if f is None]


@pytest.fixture(scope="module")
def long_header(tmp_path_factory):
    """A CT whose header does not end inside the received block (a 70 KB private element before the pixels)."""
    ds = ct_series(patient_id="LONG", patient_name="Long^Header", n=1, size=16)[0]
    ds.add_new(0x00091010, "LO", "FEDGATE")
    ds.add_new(0x00091011, "OB", bytes(70_000))
    path = tmp_path_factory.mktemp("long") / "long.dcm"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path, str(ds.SOPInstanceUID)


@pytest.mark.parametrize("seed", range(8))
async def test_parts_parsed_from_their_received_header(files, long_header, seed):
    """Parts handed over with their received first bytes are parsed at once, before their write completes;
    one whose header does not end in those bytes is parsed again from its file once written; a failed write
    fails its part (0xA700) even though its header parsed."""
    from gateway.services.dicom_parse import HEADER_READ

    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    feed = ParseFeed(WorkerPool(0), None)
    items = list(files[:6]) + [long_header] + list(files[6:])
    writes, expected = [], []
    for n, (path, sop) in enumerate(items):
        written = loop.create_future()
        raw = path.read_bytes()
        feed.add(Part(path, len(raw), head=raw[:HEADER_READ]), written, None)
        fail = n == 2
        writes.append((written, fail))
        expected.append((OUT_OF_RESOURCES, None) if fail else (None, sop))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
    order = list(range(len(writes)))
    rng.shuffle(order)
    for i in order:
        written, fail = writes[i]
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
        written.set_exception(OSError(5, "EIO")) if fail else written.set_result(None)
    outcomes, errors = await feed.results()
    assert not errors
    assert [(o.failure, o.sop_uid) for o in outcomes] == expected
    assert not any(o.retry for o in outcomes)
