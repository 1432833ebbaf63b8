"""The STOW fast header reader (mappings/dicom/rawread.py) builds exactly the data set of
``pydicom.dcmread(BytesIO(data), defer_size=1024, stop_before_pixels=True)``: element by element (tag, VR,
length, value, value position, encoding flags; sequences item by item), the same file meta, transfer
syntax and pixel data offset — or declines (``None``). Checked on every demo file, on pydicom's own test
files (odd encodings, big endian, deflate, implicit VR, truncated, ...), on synthetic CT with sequences and
character sets, and on truncated copies of them. And STOW's parse gives the same Outcome with it and
without it (pydicom reading every file)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from gateway.services import dicom_parse as dw
from mappings.dicom import rawread
from tests.conftest import data_path
from tests.unit.dicom.test_fastjson import _ct, _file, ct_with_sequences

DEMO = sorted(p for p in data_path("dicom").rglob("*.dcm"))
PYDICOM = sorted(Path(get_testdata_file("CT_small.dcm")).parent.glob("*.dcm"))


def _synthetic() -> dict[str, bytes]:
    seq = ct_with_sequences()
    utf8 = _ct(SpecificCharacterSet="ISO_IR 192", PatientName="Wang^XiaoDong=王^小東")
    jis = _ct(SpecificCharacterSet=["ISO 2022 IR 6", "ISO 2022 IR 87"], PatientName="Yamada^Tarou")
    empty = _ct(StudyDescription="", AccessionNumber="", SeriesNumber=None)
    return {"ct": _file(_ct()), "ct-seq": _file(seq), "ct-utf8": _file(utf8), "ct-jis": _file(jis),
            "ct-empty": _file(empty), "ct-implicit": _file(_ct(), implicit=True)}


def _corpus() -> list[tuple[str, bytes]]:
    out = [(f"demo/{p.parent.name}/{p.name}", p.read_bytes()) for p in DEMO]
    out += [(f"pydicom/{p.name}", p.read_bytes()) for p in PYDICOM]
    out += list(_synthetic().items())
    return out


CORPUS = _corpus()


def _same_dataset(got: Dataset, want: Dataset, where: str) -> None:
    assert list(got._dict) == list(want._dict), where
    assert got.original_encoding == want.original_encoding, where
    assert got.original_character_set == want.original_character_set, where
    for tag, w in want._dict.items():
        g = got._dict[tag]
        assert type(g) is type(w), f"{where} {tag}"
        if isinstance(w, DataElement) and w.VR != "SQ":  # converted while reading (file meta)
            assert (g.tag, g.VR, g.value, g.file_tell) == (w.tag, w.VR, w.value, w.file_tell), f"{where} {tag}"
            continue
        if isinstance(w, DataElement):  # a sequence pydicom read while reading the file
            assert (g.tag, g.VR, g.file_tell, g.is_undefined_length) == (w.tag, w.VR, w.file_tell, w.is_undefined_length)
            assert len(g.value) == len(w.value) and g.value.is_undefined_length == w.value.is_undefined_length
            for i, (gi, wi) in enumerate(zip(g.value, w.value)):
                assert (gi.seq_item_tell, gi.file_tell, gi.is_undefined_length_sequence_item) == \
                    (wi.seq_item_tell, wi.file_tell, wi.is_undefined_length_sequence_item)
                _same_dataset(gi, wi, f"{where} {tag}[{i}]")
            continue
        assert (g.tag, g.VR, g.length, g.value_tell, g.is_implicit_VR, g.is_little_endian) == \
            (w.tag, w.VR, w.length, w.value_tell, w.is_implicit_VR, w.is_little_endian), f"{where} {tag}"
        if w.value is None and w.length > 1024:  # pydicom defers values over 1024 bytes; ours are read
            assert len(g.value) == w.length, f"{where} {tag}"
        else:
            assert g.value == w.value, f"{where} {tag}"


def _check(name: str, data: bytes) -> bool:
    """True when the fast reader took the file (and agreed with pydicom)."""
    fast = rawread.read_header(data)
    if fast is None:
        return False
    ds, ts, pixel_at = fast
    src = io.BytesIO(data)
    want = pydicom.dcmread(src, defer_size=1024, stop_before_pixels=True)
    assert pixel_at == src.tell(), name
    assert ts == want.file_meta.TransferSyntaxUID, name
    assert (ds.preamble, ds.is_implicit_VR, ds.is_little_endian) == (want.preamble, want.is_implicit_VR,
                                                                     want.is_little_endian), name
    for got_ds, want_ds in ((ds, want), (ds.file_meta, want.file_meta)):  # every attribute pydicom sets
        skip = {"_dict", "buffer", "file_meta", "fileobj_type", "filename", "timestamp"}
        assert {k: v for k, v in vars(got_ds).items() if k not in skip} == \
            {k: v for k, v in vars(want_ds).items() if k not in skip}, name
    _same_dataset(ds.file_meta, want.file_meta, f"{name} file meta")
    _same_dataset(ds, want, name)
    assert ds.to_json_dict(suppress_invalid_tags=True) == want.to_json_dict(suppress_invalid_tags=True), name
    return True


@pytest.mark.parametrize("name,data", CORPUS, ids=[n for n, _ in CORPUS])
def test_reads_like_dcmread_or_declines(name: str, data: bytes):
    _check(name, data)


def test_it_takes_the_common_files_and_declines_the_others():
    taken = {name for name, data in CORPUS if _check(name, data)}
    for name in ("ct", "ct-seq", "ct-utf8", "ct-jis", "ct-empty", "ct-implicit", "pydicom/CT_small.dcm",
                 "pydicom/JPEG2000.dcm", "pydicom/MR_small_implicit.dcm"):
        assert name in taken, name
    for name in ("pydicom/MR_small_bigendian.dcm",
                 "pydicom/ExplVR_LitEndNoMeta.dcm", "pydicom/image_dfl.dcm"):
        assert name not in taken, name
    assert any(n.startswith("demo/") for n in taken)


@pytest.mark.parametrize("name,data", [c for c in CORPUS if c[0] in ("ct-seq", "pydicom/CT_small.dcm", "ct-utf8", "ct-implicit")],
                         ids=lambda c: c if isinstance(c, str) else "")
def test_truncated_copies_decline_or_agree(name: str, data: bytes):
    pixel_at = rawread.read_header(data)[2]
    for cut in sorted({0, 100, 131, 132, 140, 200, 300, 400, pixel_at - 1, pixel_at, pixel_at + 5, len(data) - 1}):
        part = data[:cut]
        fast = rawread.read_header(part)
        if fast is None:
            continue
        # taken: only when the cut leaves a whole header (pydicom reads the same data set from it)
        assert fast[2] <= cut
        _check(f"{name}[:{cut}]", part)


@pytest.mark.parametrize("name,data", [c for c in CORPUS if c[0].startswith(("pydicom/", "ct"))],
                         ids=lambda c: c if isinstance(c, str) else "")
def test_stow_parse_outcome_is_the_same_without_it(name: str, data: bytes, tmp_path, monkeypatch):
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    part = dw.Part(path, len(data))
    fast = dataclasses.asdict(dw._parse_part(part, None))
    with monkeypatch.context() as m:
        m.setattr(rawread, "read_header", lambda data: None)
        slow = dataclasses.asdict(dw._parse_part(part, None))
    assert fast == slow
