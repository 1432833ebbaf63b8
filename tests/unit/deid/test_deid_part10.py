"""A stored file de-identified to PS3.10 bytes (mappings.deid.part10): the very bytes of reading the whole
file with pydicom, de-identifying the data set and writing it with ``save_as(enforce_file_format=True)``,
for the demo data, pydicom's own test files (implicit / explicit VR, big endian, deflate, compressed,
odd lengths, private sequences, trailing padding) and synthetic CT."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from mappings.deid.dicom import DeidOptions, Withheld, deidentify_dataset
from mappings.deid.keys import ProjectKeys
from mappings.deid.part10 import deidentify_part10, pixel_tail
from mappings.dicom.rawread import read_header
from tests.conftest import data_path
from tests.dicom_synth import ct_series, to_bytes

KEYS = ProjectKeys("study-a", b"k" * 32)
PYDICOM_FILES = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))
DEMO = sorted(data_path("dicom").rglob("*.dcm"))


def _reference(data: bytes, options: DeidOptions | None, patient_key: str | None) -> bytes | Withheld | None:
    """Read, de-identify and write with pydicom as a whole; None where pydicom cannot do it."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        out = deidentify_dataset(ds, KEYS, options, patient_key=patient_key)
        if isinstance(out, Withheld):
            return out
        buf = io.BytesIO()
        out.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    except (InvalidDicomError, ValueError, AttributeError, KeyError, TypeError, NotImplementedError, EOFError):
        return None


def _files() -> list[tuple[str, bytes]]:
    out = [(p.name, p.read_bytes()) for p in DEMO + PYDICOM_FILES]
    out += [(f"synthetic-ct-{i}", to_bytes(ds)) for i, ds in enumerate(
        ct_series(patient_id="p-1", patient_name="Doe^Jane", n=2, size=32))]
    return out


@pytest.mark.parametrize("options", [DeidOptions(), DeidOptions(clean_descriptors=True, device_identity=True,
                                                                 patient_characteristics=True)])
def test_same_bytes_as_pydicom_read_deidentify_write(options):
    compared = spliced = 0
    for name, data in _files():
        want = _reference(data, options, "p-1")
        if want is None:
            continue
        got = deidentify_part10(data, KEYS, options, patient_key="p-1")
        if isinstance(want, Withheld):
            assert isinstance(got, Withheld) and got.reason == want.reason, name
        else:
            assert isinstance(got, bytes) and got == want, name
        compared += 1
        head = read_header(data)
        spliced += head is not None and pixel_tail(data, head[2], head[1]) not in (None, b"")
    assert compared >= 80 and spliced >= 40, (compared, spliced)


def test_trailing_padding_is_dropped_and_other_elements_after_the_pixel_data_are_deidentified():
    ds = ct_series(patient_id="p-1", patient_name="Doe^Jane", n=1, size=16)[0]
    ds.add_new(0xFFFCFFFC, "OB", b"Doe Jane padding")  # Data Set Trailing Padding: X
    padded = to_bytes(ds)
    block = ds.private_block(0x7FE1, "ACME AFTER PIXELS", create=True)  # a private group after the pixel data
    block.add_new(0x01, "LO", "Doe Jane private")
    after = to_bytes(ds)
    for data, spliced in ((padded, True), (after, False)):
        head = read_header(data)
        assert head is not None and (pixel_tail(data, head[2], head[1]) is not None) == spliced
        out = deidentify_part10(data, KEYS, patient_key="p-1")
        assert isinstance(out, bytes) and b"Doe Jane" not in out and out == _reference(data, None, "p-1")
        assert pydicom.dcmread(io.BytesIO(out)).PixelData == ds.PixelData
