"""Synthetic DICOM for tests and benchmarks: CT series with real pixel data (pydicom + numpy)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_series(*, patient_id: str, patient_name: str, n: int = 5, size: int = 64, study_uid: str | None = None,
              study_date: str = "20240115", modality: str = "CT", manufacturer: str = "ACME",
              accession: str = "ACC1", issuer: str | None = None, series_description: str = "AXIAL",
              body_part: str = "CHEST", sex: str = "F", birth_date: str = "19700101",
              pixels: list[np.ndarray] | None = None) -> list[Dataset]:
    """``n`` CT slices of random noise, or one slice per stored-value array in ``pixels`` (int16, HU + 1024)."""
    if pixels is not None:
        n, size = len(pixels), pixels[0].shape[0]
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference = generate_uid()
    out = []
    rng = np.random.default_rng(abs(hash((patient_id, series_uid))) % 2**32)
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128  # a PS3.10 file, as a PACS sends it
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = patient_id, patient_name, sex, birth_date
        if issuer:
            ds.IssuerOfPatientID = issuer
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = study_date, "101500", accession, "1"
        ds.StudyDescription = "CT CHEST"
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = modality, manufacturer, "Model X"
        ds.SeriesNumber, ds.SeriesDescription, ds.BodyPartExamined = 1, series_description, body_part
        ds.ProtocolName, ds.SliceThickness, ds.KVP, ds.ConvolutionKernel = "CHEST ROUTINE", 2.5, 120, "B30f"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i) * 2.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        px = pixels[i] if pixels is not None else rng.normal(1000, 50, (size, size))
        ds.PixelData = np.asarray(px).astype(np.int16).tobytes()
        out.append(ds)
    return out


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def to_bytes(ds: Dataset) -> bytes:
    """A dataset as the bytes of a DICOM file (Part 10, with preamble and file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stow_body(parts, boundary: str, ctype: str = "application/dicom") -> bytes:
    """A multipart/related STOW-RS body of ``parts`` (bytes, or datasets written with :func:`to_bytes`)."""
    out = b""
    for p in parts:
        data = p if isinstance(p, (bytes, bytearray)) else to_bytes(p)
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def referenced_sops(response: dict, tag: str) -> list[str]:
    """SOP Instance UIDs in a STOW-RS response's ReferencedSOPSequence (00081199) or FailedSOPSequence
    (00081198)."""
    return [i["00081155"]["Value"][0] for i in response.get(tag, {}).get("Value", []) if "00081155" in i]
