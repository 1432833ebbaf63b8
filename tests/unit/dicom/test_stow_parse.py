"""STOW's per-instance parse (gateway/services/dicom_parse.py:_parse_part): the header read from one in-memory
block gives exactly the Outcome of the read from the file (metadata JSON, index rows, content rows, failure
and reason) on every demo file, synthetic CT, oversized headers and truncated copies; a truncated SR fails
that instance (0xC000) instead of raising out of the parse (which failed the whole request)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.services import dicom_parse as dw
from tests.conftest import data_path
from tests.dicom_synth import ct_series, to_bytes

DEMO = sorted(p for p in data_path("dicom").rglob("*.dcm"))


def _outcome(path: Path) -> dict:
    return dataclasses.asdict(dw._parse_part(dw.Part(path, path.stat().st_size), None))


def _from_file(path: Path, monkeypatch) -> dict:
    """The same parse with a 1-byte header block: the header never fits, so it is read from the file."""
    with monkeypatch.context() as m:
        m.setattr(dw, "HEADER_READ", 1)
        return _outcome(path)


def _variants(raw: bytes, name: str, folder: Path) -> list[Path]:
    """The file, truncated copies (inside the preamble, file meta, header, pixel data, around the block size)."""
    out = [folder / f"{name}.dcm"]
    out[0].write_bytes(raw)
    for cut in (0, 10, 131, 140, 300, 1000, 5000, dw.HEADER_READ - 2, dw.HEADER_READ, dw.HEADER_READ + 3,
                len(raw) // 2, len(raw) - 1):
        if 0 <= cut < len(raw):
            p = folder / f"{name}-cut{cut}.dcm"
            p.write_bytes(raw[:cut])
            out.append(p)
    return out


def test_demo_files_are_there():
    assert len(DEMO) >= 20


def _from_received_header(path: Path) -> dict:
    """The parse STOW starts as soon as a part has arrived: from its first bytes as received, again from
    its file when those are not enough (``retry``)."""
    raw = path.read_bytes()
    out = dw._parse_part(dw.Part(path, len(raw), head=raw[:dw.HEADER_READ]), None)
    if out.retry:
        out = dw._parse_part(dw.Part(path, len(raw)), None)
    return dataclasses.asdict(out)


@pytest.mark.parametrize("path", DEMO, ids=lambda p: p.name)
def test_demo_files_and_truncated_copies(path: Path, tmp_path, monkeypatch):
    for p in _variants(path.read_bytes(), path.stem, tmp_path):
        assert _outcome(p) == _from_file(p, monkeypatch), p.name
        assert _from_received_header(p) == _outcome(p), p.name


@pytest.mark.parametrize("vr,size", [("OB", 70_000), ("UT", 70_000), ("OB", dw.HEADER_READ - 700), ("LT", 1000)])
def test_headers_longer_than_the_block(vr, size, tmp_path, monkeypatch):
    """A large element before the pixel data: the header ends beyond (or right at) the in-memory block."""
    ds = ct_series(patient_id="HDR", patient_name="Long^Header", n=1, size=64)[0]
    if vr in ("OB",):
        ds.add_new(0x00091010, "LO", "FEDGATE")
        ds.add_new(0x00091011, vr, b"\x01" * size)
    else:
        ds.add_new(0x00204000, vr, "x" * size)
    raw = to_bytes(ds)
    for p in _variants(raw, f"{vr}{size}", tmp_path):
        assert _outcome(p) == _from_file(p, monkeypatch), p.name
        assert _from_received_header(p) == _outcome(p), p.name
    whole = _outcome(tmp_path / f"{vr}{size}.dcm")
    assert whole["failure"] is None and whole["sop_uid"] == str(ds.SOPInstanceUID)


def test_synthetic_ct_is_parsed_from_memory(tmp_path, monkeypatch):
    """The common case takes the in-memory path — the fast header reader, no pydicom read at all (see
    tests/unit/dicom/test_rawread.py) — and matches the file read."""
    calls = []
    real = dw.dcmread

    def spy(src, **kw):
        calls.append(type(src).__name__)
        return real(src, **kw)

    ds = ct_series(patient_id="MEM", patient_name="In^Memory", n=1, size=128)[0]
    p = tmp_path / "ct.dcm"
    p.write_bytes(to_bytes(ds))
    monkeypatch.setattr(dw, "dcmread", spy)
    got = _outcome(p)
    assert calls == []
    assert got == _from_file(p, monkeypatch)
    assert got["failure"] is None and got["rows"] is not None


def test_truncated_sr_fails_the_instance(tmp_path):
    """An SR cut inside its content sequence reads without error up to there: the content walk must not
    raise out of the parse (that failed every instance of the request); the instance fails with 0xC000."""
    sr = next(p for p in DEMO if p.name == "sr_document.dcm")  # (the old parse raised on 4 of these cuts)
    raw = sr.read_bytes()
    ds = dcmread(sr)
    assert ds.SOPClassUID.startswith(dw.SR_CLASS_PREFIX)
    failed = 0
    for cut in range(len(raw) // 2, len(raw), max(1, len(raw) // 40)):
        p = tmp_path / f"sr-{cut}.dcm"
        p.write_bytes(raw[:cut])
        out = dw._parse_part(dw.Part(p, cut), None)  # never raises
        if out.failure is not None:
            assert out.failure == dw.CANNOT_UNDERSTAND and out.reason
            failed += 1
    assert failed  # the truncations are noticed
