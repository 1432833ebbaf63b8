"""DICOM de-identification (PS3.15 Annex E, issue #24): table actions on the demo data, dciodvfy, pixel data,
SR/SEG references, deterministic UIDs, planted PHI."""

from __future__ import annotations

import copy
import hashlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mappings.deid.dates import shift_dicom_date
from mappings.deid.dicom import SAFE_PRIVATE, DeidOptions, Withheld, _resolve, action_for, deidentify_dataset
from mappings.deid.fhir import deidentify_resource
from mappings.deid.keys import ProjectKeys
from tests.conftest import data_path

KEYS = ProjectKeys("study-a", b"k" * 32)
DEMO = sorted(p for p in data_path("dicom").rglob("*.dcm"))


def _deid(path: Path, keys: ProjectKeys = KEYS, **kw) -> tuple[Dataset, Dataset | Withheld]:
    src = pydicom.dcmread(path)
    return src, deidentify_dataset(copy.deepcopy(src), keys, **kw)


def _empty(value) -> bool:
    return value is None or value == "" or value == b"" or (hasattr(value, "__len__") and len(value) == 0)


def _check(src: Dataset, out: Dataset, offset: int, seen: set[int], path: str = "") -> None:
    opts = DeidOptions()
    for elem in src:
        tag = int(elem.tag)
        where = f"{path}{elem.keyword or hex(tag)}"
        if elem.tag.group % 2 == 1:
            if elem.tag in out and elem.tag.element >= 0x100:
                creator = str(out[pydicom.tag.Tag(elem.tag.group, elem.tag.element >> 8)].value)
                assert (creator, elem.tag.group, elem.tag.element & 0xFF) in SAFE_PRIVATE, f"private {where} kept"
            continue
        code = action_for(tag, opts)
        if code is None:
            if elem.VR == "SQ" and elem.tag in out:
                for a, b in zip(elem.value, out[elem.tag].value):
                    _check(a, b, offset, seen, where + ">")
            continue
        seen.add(tag)
        act = _resolve(code)
        if act == "X" or (act == "C" and elem.VR in ("OB", "OW", "UN")):
            assert elem.tag not in out, f"{where} ({code}) not removed"
            continue
        assert elem.tag in out, f"{where} ({code}) missing"
        new = out[elem.tag].value
        if act == "Z":
            assert _empty(new), f"{where} (Z) not emptied"
        elif elem.VR == "SQ":
            for a, b in zip(elem.value, new):
                _check(a, b, offset, seen, where + ">")
        elif act == "U" or (act == "D" and elem.VR == "UI"):
            olds = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
            news = new if isinstance(new, (list, pydicom.multival.MultiValue)) else [new]
            assert list(news) == [KEYS.uid_for(str(v)) for v in olds], f"{where} (U) not remapped"
        elif act == "D":
            assert _empty(elem.value) or (not _empty(new) and new != elem.value), f"{where} (D) not replaced"
        elif act == "K":
            assert new == elem.value or elem.VR == "AS", f"{where} (K) changed"
        elif act == "C" and elem.VR == "DA" and not _empty(elem.value):
            assert new == shift_dicom_date(elem.value, offset), f"{where} (C) date not shifted"


def test_every_table_attribute_in_the_demo_data_follows_its_action_code():
    seen: set[int] = set()
    for path in DEMO:
        src, out = _deid(path, patient_key="p-1")
        if isinstance(out, Withheld):
            continue
        _check(src, out, KEYS.date_offset_days("p-1"), seen)
        assert out.PatientIdentityRemoved == "YES"
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
        assert codes[0] == "113100" and "113107" in codes
        assert "2024e" in out.DeidentificationMethod
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    # the demo data exercises a real share of Table E.1-1
    assert len(seen) >= 40, sorted(hex(t) for t in seen)
    assert {"X", "Z", "U", "D", "C"} <= {_resolve(action_for(t, DeidOptions())) for t in seen}


def _errors(path: Path) -> set[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {re.sub(r"\d+(\.\d+){2,}", "#", line.split("Error - ", 1)[1])
            for line in (r.stdout + r.stderr).splitlines() if "Error - " in line}


def test_dciodvfy_finds_no_new_errors_and_pixel_data_is_unchanged(tmp_path):
    assert shutil.which("dciodvfy"), "dciodvfy missing: run scripts/setup.d/60-dicom3tools.sh"
    checked = 0
    for path in DEMO:
        src, out = _deid(path)
        if isinstance(out, Withheld):
            continue
        target = tmp_path / "out.dcm"
        out.save_as(target, enforce_file_format=True)
        assert _errors(target) <= _errors(path), path.name
        if "PixelData" in src:
            assert hashlib.sha256(out.PixelData).digest() == hashlib.sha256(src.PixelData).digest()
        checked += 1
    assert checked >= 20


def _refs(node: Dataset, out: set[str]) -> set[str]:
    for elem in node:
        if elem.VR == "SQ":
            for item in elem.value:
                _refs(item, out)
        elif elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out


def test_sr_and_seg_references_resolve_after_deidentification():
    folder = sorted(data_path("dicom", "dcmqi").rglob("*.dcm"))
    srcs = [pydicom.dcmread(p) for p in folder]
    outs = [deidentify_dataset(copy.deepcopy(d), KEYS) for d in srcs]
    src_uids = {d.SOPInstanceUID for d in srcs}
    out_uids = {d.SOPInstanceUID for d in outs}
    resolved = 0
    for src, out in zip(srcs, outs):
        if src.Modality not in ("SR", "SEG"):
            continue
        for ref in _refs(src, set()):
            if ref in src_uids:
                assert KEYS.uid_for(ref) in _refs(out, set()) and KEYS.uid_for(ref) in out_uids
                resolved += 1
        if "FrameOfReferenceUID" in src:
            assert out.FrameOfReferenceUID == KEYS.uid_for(src.FrameOfReferenceUID)
    assert resolved >= 3
    assert not src_uids & out_uids


def test_uids_are_deterministic_per_project_and_unrelated_across_projects():
    path = data_path("dicom", "highdicom", "ct_image.dcm")
    a1 = _deid(path)[1]
    a2 = _deid(path)[1]
    b = _deid(path, ProjectKeys("study-b", b"k" * 32))[1]
    assert a1.SOPInstanceUID == a2.SOPInstanceUID and a1.StudyInstanceUID == a2.StudyInstanceUID
    assert a1.SOPInstanceUID != b.SOPInstanceUID and a1.StudyInstanceUID != b.StudyInstanceUID
    assert re.fullmatch(r"2\.25\.\d{1,39}", a1.SOPInstanceUID)


PHI = ["Zebulon", "Quartermaine", "MRN7734501", "Wallaby", "19380412", "Dr^Nefarious", "Nefarious"]


def _planted() -> Dataset:
    ds = pydicom.dcmread(data_path("dicom", "highdicom", "ct_image.dcm"))
    ds.PatientName = "Quartermaine^Zebulon"
    ds.PatientID = "MRN7734501"
    ds.PatientBirthDate = "19380412"
    ds.PatientAddress = "42 Wallaby Way, Sydney"
    ds.ReferringPhysicianName = "Dr^Nefarious"
    ds.ImageComments = "Zebulon Quartermaine, MRN7734501, called"
    ds.StudyDescription = "CT for Zebulon"
    other = Dataset()
    other.PatientID = "MRN7734501"
    other.IssuerOfPatientID = "Wallaby Hospital"
    ds.OtherPatientIDsSequence = Sequence([other])
    req = Dataset()
    req.RequestedProcedureDescription = "Quartermaine follow-up"
    req.ScheduledProcedureStepDescription = "MRN7734501"
    ds.RequestAttributesSequence = Sequence([req])
    block = ds.private_block(0x0011, "ACME PHI", create=True)
    block.add_new(0x01, "LO", "Zebulon Quartermaine")
    inner = Dataset()
    inner.PatientName = "Quartermaine^Zebulon"
    block.add_new(0x02, "SQ", Sequence([inner]))
    return ds


def test_planted_phi_appears_nowhere_in_the_deidentified_instance():
    for options in (DeidOptions(), DeidOptions(clean_descriptors=True, patient_characteristics=True,
                                                device_identity=True)):
        out = deidentify_dataset(_planted(), KEYS, options, patient_key="pat-7")
        buf = io.BytesIO()
        out.save_as(buf, enforce_file_format=True)
        raw = buf.getvalue()
        for text in PHI:
            assert text.encode() not in raw, text
            assert text.lower().encode() not in raw.lower(), text


def test_burned_in_annotation_is_withheld():
    ds = _planted()
    ds.BurnedInAnnotation = "YES"
    assert isinstance(deidentify_dataset(ds, KEYS), Withheld)
    sc = _planted()
    sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert isinstance(deidentify_dataset(copy.deepcopy(sc), KEYS), Withheld)
    sc.BurnedInAnnotation = "NO"
    assert not isinstance(deidentify_dataset(sc, KEYS), Withheld)


def test_safe_private_attributes_are_kept_with_their_creator():
    ds = _planted()
    block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    block.add_new(0x0E, "FL", 1.5)
    block.add_new(0x0F, "LO", "Zebulon")
    out = deidentify_dataset(ds, KEYS)
    kept = out.private_block(0x2005, "Philips MR Imaging DD 001")
    assert kept[0x0E].value == 1.5 and 0x0F not in kept
    assert "113111" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]


def test_same_date_offset_and_patient_pseudonym_in_fhir_and_dicom():
    ds = _planted()
    ds.StudyDate = "20200315"
    out = deidentify_dataset(ds, KEYS, patient_key="pat-7")
    study = deidentify_resource({"resourceType": "ImagingStudy", "id": "s1", "status": "available",
                                 "subject": {"reference": "Patient/pat-7"}, "started": "2020-03-15T10:00:00Z"}, KEYS)
    patient = deidentify_resource({"resourceType": "Patient", "id": "pat-7"}, KEYS)
    assert study["started"][:10].replace("-", "") == out.StudyDate
    assert out.StudyDate != "20200315"
    assert out.PatientID == patient["id"] == study["subject"]["reference"].split("/")[1]
