"""The STOW fast DICOM JSON encoder (mappings/dicom/fastjson.py) gives exactly pydicom's
``Dataset.to_json_dict(suppress_invalid_tags=True)``: on every demo file (CT, MR, SR, SEG), on a synthetic CT
like the benchmark's, and on a table of odd values (character sets, multi-values, empty and invalid values
that pydicom's strict reading drops, sequences, implicit VR, private and UN elements)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mappings.dicom import attributes as attrs
from mappings.dicom.fastjson import dataset_json
from tests.conftest import data_path

DEMO = sorted(p for p in data_path("dicom").rglob("*.dcm"))


def _reference(raw: bytes, **read) -> dict:
    ds = pydicom.dcmread(io.BytesIO(raw), **read)
    return ds.to_json_dict(bulk_data_threshold=attrs.BULK_THRESHOLD, bulk_data_element_handler=attrs.bulk_handler,
                           suppress_invalid_tags=True)


def _fast(raw: bytes, **read) -> dict:
    ds = pydicom.dcmread(io.BytesIO(raw), **read)
    return dataset_json(ds, bulk_data_threshold=attrs.BULK_THRESHOLD, bulk_data_element_handler=attrs.bulk_handler)


def _same(raw: bytes, **read) -> dict:
    expected, got = _reference(raw, **read), _fast(raw, **read)
    assert list(got) == list(expected)  # same elements in the same order
    for key in expected:
        assert got[key] == expected[key], key
    return got


def test_demo_files_are_there():
    assert len(DEMO) >= 20


@pytest.mark.parametrize("path", DEMO, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("read", [{"defer_size": 1024, "stop_before_pixels": True}, {"defer_size": 1024}, {}],
                         ids=["header", "deferred", "full"])
def test_demo_files_encode_like_pydicom(path: Path, read):
    _same(path.read_bytes(), **read)


def _file(ds: Dataset, *, implicit: bool = False) -> bytes:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fm.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = fm
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ct(**extra) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.StudyDate, ds.StudyTime = "20240131", "101500.123"
    ds.AccessionNumber = "A0001"
    ds.Modality = "CT"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "P-001"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "M"
    ds.SliceThickness = "2.50"
    ds.KVP = "120"
    ds.SeriesNumber = "3"
    ds.InstanceNumber = "17"
    ds.ImagePositionPatient = ["-250.0", "-250", "-12.5"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = ["0.9765625", "0.9765625"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = bytes(32)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def test_synthetic_ct_header_and_full():
    raw = _file(_ct())
    got = _same(raw, defer_size=1024, stop_before_pixels=True)
    assert got["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]}
    assert got["00180050"] == {"vr": "DS", "Value": [2.5]} and got["00200013"] == {"vr": "IS", "Value": [17]}
    _same(raw)


def test_synthetic_ct_implicit_vr():
    _same(_file(_ct(), implicit=True), defer_size=1024, stop_before_pixels=True)


def _raw_element(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put an encoded value in a dataset as-is (bypassing pydicom's checks on assignment)."""
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


ODD = [
    # (tag, VR, encoded value) — each written into a CT and compared with pydicom
    (0x00080060, "CS", b"ct"),                      # invalid CS (lower case): pydicom drops it
    (0x00080060, "CS", b"CT\\MR"),                  # multi-valued
    (0x00080060, "CS", b"CT\\"),                    # empty second value
    (0x00080060, "CS", b"  "),                      # spaces only → empty
    (0x00080060, "CS", b""),                        # empty
    (0x00080008, "CS", b"ORIGINAL\\PRIMARY\\AXIAL\\" + b"X" * 17),  # a value over 16 characters
    (0x00200013, "IS", b"1.0 "),                    # IS written as a float
    (0x00200013, "IS", b" 42"),                     # leading space
    (0x00200013, "IS", b"  "),                      # whitespace only
    (0x00200013, "IS", b"99999999999 "),            # over 2**31
    (0x00200013, "IS", b"1\\2"),
    (0x00180050, "DS", b"abc "),                    # not a number
    (0x00180050, "DS", b" 1.5e2"),
    (0x00180050, "DS", b"1.2345678901234567"),      # over 16 characters
    (0x00180050, "DS", b"nan "),
    (0x00280030, "DS", b"0.5\\0.50"),
    (0x00280030, "DS", b"0.5\\"),
    (0x00080018, "UI", b"1.2.03.4\x00"),            # leading zero: invalid UID
    (0x00080018, "UI", b"1.2.3.4\x00"),
    (0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2 "),
    (0x00100010, "PN", b"Doe^John=Ideo^Graphic=Pho^Netic"),
    (0x00100010, "PN", b"Doe^John\\Roe^Jane "),
    (0x00100010, "PN", b"Doe^John\\"),
    (0x00100010, "PN", b"A" * 70),                  # component over 64 characters
    (0x00100020, "LO", b"P" * 65),                  # over 64 characters
    (0x00100020, "LO", b" lead and trail  "),
    (0x00100020, "LO", b"a\\b\\"),
    (0x00081030, "LO", b"caf\xe9 "),                # Latin-1 byte
    (0x00104000, "LT", b"free text with a \\ backslash  "),
    (0x00080020, "DA", b"20241301"),                # month 13
    (0x00080020, "DA", b"20240101-20240201"),       # a range
    (0x00080030, "TM", b"2561"),
    (0x00080030, "TM", b"101500.123456 "),
    (0x00101010, "AS", b"045Y"),
    (0x00101010, "AS", b"45Y "),
    (0x00080054, "AE", b" STORESCU  \\PACS"),
    (0x00081190, "UR", b"http://example.org/a b  "),
    (0x00280010, "US", struct.pack("<H", 512)),
    (0x00280010, "US", b"\x01"),                    # odd length
    (0x00281101, "US", struct.pack("<3H", 256, 0, 16)),  # LUT descriptor
    (0x00189305, "FD", struct.pack("<2d", 1.5, -0.25)),
    (0x00189306, "FL", struct.pack("<f", 0.1)),
    (0x00209165, "AT", struct.pack("<HHHH", 0x0020, 0x0032, 0x0018, 0x1150)),
    (0x00291010, "OB", bytes(range(200))),          # private, small: InlineBinary
    (0x00291011, "OB", bytes(3000)),                # private, large: BulkDataURI
    (0x00291012, "UN", b"raw\x00"),
    (0x00091002, "UN", b"x" * 10),
    (0x00280106, "US", struct.pack("<H", 7)),
]


@pytest.mark.parametrize("tag,vr,value", ODD, ids=[f"{t:08X}-{vr}-{i}" for i, (t, vr, _) in enumerate(ODD)])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", None])
def test_odd_values_encode_like_pydicom(tag, vr, value, charset):
    ds = _ct()
    if charset is None:
        del ds.SpecificCharacterSet
        ds.PatientName = "Doe^John"
    else:
        ds.SpecificCharacterSet = charset
    ds.add_new(0x00290010, "LO", "FEDGATE TEST")
    raw = _file(ds)
    read = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    _raw_element(read, tag, vr, value)
    read.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    read.save_as(buf, enforce_file_format=True)  # raw elements are written back as they are
    _same(buf.getvalue(), defer_size=1024, stop_before_pixels=True)


def test_utf8_names_and_code_extensions():
    ds = _ct(SpecificCharacterSet="ISO_IR 192", PatientName="Wang^XiaoDong=王^小東")
    _same(_file(ds), stop_before_pixels=True)
    ds = _ct(SpecificCharacterSet=["ISO 2022 IR 6", "ISO 2022 IR 87"], PatientName="Yamada^Tarou")
    _same(_file(ds), stop_before_pixels=True)


def ct_with_sequences() -> Dataset:
    """A CT with a nested sequence (an item holding a code sequence), an empty item and an empty sequence."""
    ds = _ct()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.AnatomicRegionSequence = Sequence([])
    return ds


def test_sequences_nested_and_odd():
    ds = ct_with_sequences()
    raw = _file(ds)
    got = _same(raw, stop_before_pixels=True)
    assert got["00081140"]["Value"][0]["00081155"] == {"vr": "UI", "Value": ["1.2.3.4"]}
    _same(_file(ds, implicit=True), stop_before_pixels=True)
    bad = Dataset()
    bad.CodeValue, bad.CodingSchemeDesignator, bad.CodeMeaning = "x", "SRT", "m" * 70  # LO too long, in an item
    ds.AnatomicRegionSequence = Sequence([bad])
    _same(_file(ds), stop_before_pixels=True)


def test_header_path_announces_pixel_data_as_bulk():
    got = _fast(_file(_ct()), stop_before_pixels=True)
    assert "7FE00010" not in got  # the STOW parser adds the placeholder itself (see _read_header)


def _rows_both_ways(raw: bytes) -> tuple[tuple, tuple]:
    kw = {"blob_path": "", "size": len(raw), "transfer_syntax": "x", "now": 0.0, "patient_id": None}
    plain = pydicom.dcmread(io.BytesIO(raw), defer_size=1024, stop_before_pixels=True)
    ds = pydicom.dcmread(io.BytesIO(raw), defer_size=1024, stop_before_pixels=True)
    meta = dataset_json(ds, bulk_data_threshold=attrs.BULK_THRESHOLD, bulk_data_element_handler=attrs.bulk_handler)
    return attrs.index_rows(attrs.MetaView(meta, ds), **kw), attrs.index_rows(plain, **kw)


@pytest.mark.parametrize("path", DEMO, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_index_rows_from_the_metadata_equal_pydicom(path: Path):
    via_json, via_pydicom = _rows_both_ways(path.read_bytes())
    assert via_json == via_pydicom


@pytest.mark.parametrize("extra", [
    {}, {"KVP": "120", "SliceThickness": "0.50", "PixelSpacing": ["0.5", "0.50"]},
    {"PatientName": "Yamada^Tarou=山田^太郎", "SpecificCharacterSet": "ISO_IR 192"},
    {"Modality": "ct", "SeriesNumber": "007", "InstanceNumber": None, "StudyDescription": ""},
    {"Manufacturer": ["A", "B"], "NumberOfFrames": "3", "PatientID": " padded "},
], ids=["plain", "ds", "pn-groups", "invalid-and-empty", "multi"])
def test_index_rows_of_odd_values_equal_pydicom(extra):
    ds = _ct()
    for keyword, value in extra.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    via_json, via_pydicom = _rows_both_ways(_file(ds))
    assert via_json == via_pydicom


def test_memoised_elements_follow_the_character_set():
    """The element memo (``fastjson._SEEN``): the same bytes under another character set are decoded again,
    and a warm memo gives pydicom's result (a memo keyed on the bytes alone would answer the first)."""
    from mappings.dicom import fastjson

    fastjson._SEEN.clear()
    for charset, expected in (("ISO_IR 100", "CafÃ©"), ("ISO_IR 192", "Café"), ("ISO_IR 100", "CafÃ©")):
        ds = _ct(SpecificCharacterSet=charset)
        read = pydicom.dcmread(io.BytesIO(_file(ds)), stop_before_pixels=True)
        _raw_element(read, 0x00081030, "LO", b"Caf\xc3\xa9")
        buf = io.BytesIO()
        read.save_as(buf, enforce_file_format=True)
        for _ in range(2):  # cold, then warm
            got = _same(buf.getvalue(), defer_size=1024, stop_before_pixels=True)
            assert got["00081030"] == {"vr": "LO", "Value": [expected]}
    assert any(key[0] == 0x00081030 for key in fastjson._SEEN)  # (the memo was used)


@pytest.mark.parametrize("value", [b"0.50", b" 1.5e2", b"120 ", b"0.5\\0.50 ", b" 3 \\ 4", b"+1.0", b""],
                         ids=["plain", "lead", "trail", "multi", "padded-multi", "plus", "empty"])
def test_index_rows_read_decimal_strings_as_pydicom(value):
    """DS values come from the raw bytes (pydicom's string of each value), not from the JSON numbers."""
    ds = pydicom.dcmread(io.BytesIO(_file(_ct())), stop_before_pixels=True)
    for tag in (0x00180050, 0x00180060, 0x00280030):  # SliceThickness, KVP, PixelSpacing
        _raw_element(ds, tag, "DS", value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    via_json, via_pydicom = _rows_both_ways(buf.getvalue())
    assert via_json == via_pydicom
    assert via_json[1]["pixel_spacing"] == ("\\".join(v.strip() for v in value.decode().split("\\")) or None)
