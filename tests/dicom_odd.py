"""Odd DICOM instances for the issue-20 tests: bad UIDs, deep nesting, VR/length mismatches, big endian,
deflate, YBR_FULL_422 — each built from a synthetic CT instance (tests/dicom_synth.py)."""

from __future__ import annotations

import io

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.dicom_synth import ct_series, to_bytes


def ct(**kw) -> Dataset:
    kw.setdefault("patient_id", "ODD1")
    kw.setdefault("patient_name", "Odd^Instance")
    kw.setdefault("n", 1)
    kw.setdefault("size", 16)
    return ct_series(**kw)[0]


def with_uids(ds: Dataset, **uids: str) -> bytes:
    """The instance with UID attributes replaced by raw values (written as given, even when invalid)."""
    for kw, value in uids.items():
        setattr(ds, kw, value)
        if kw == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    return to_bytes(ds)


def nested(depth: int) -> bytes:
    """A CT instance with a private-free standard sequence nested ``depth`` levels deep."""
    ds = ct()
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner])
    return to_bytes(ds)


def vr_mismatch(data: bytes, tag: bytes, old_vr: bytes, new_vr: bytes) -> bytes:
    """Explicit VR LE bytes with one element's VR re-coded (its length and value unchanged)."""
    at = data.index(tag + old_vr)
    return data[:at] + tag + new_vr + data[at + len(tag) + 2:]


MODALITY = b"\x08\x00\x60\x00"  # (0008,0060) little endian


def modality_as_sl() -> bytes:
    return vr_mismatch(to_bytes(ct()), MODALITY, b"CS", b"SL")


def sha256_uids() -> bytes:
    import hashlib

    h = [hashlib.sha256(f"{i}{generate_uid()}".encode()).hexdigest() for i in range(3)]
    return with_uids(ct(), StudyInstanceUID=h[0], SeriesInstanceUID=h[1], SOPInstanceUID=h[2])


def saved(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True, ts: str | None = None) -> bytes:
    """The dataset written in another transfer syntax (pydicom's own writer; pixel data of 16 bits swapped
    for big endian)."""
    from pydicom import dcmwrite

    ds = ds.copy()
    if ts:
        ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    if not little_endian:
        import numpy as np

        arr = np.frombuffer(ds.PixelData, dtype="<i2")
        ds.PixelData = arr.astype(">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
    dcmwrite(buf, ds, implicit_vr=implicit_vr, little_endian=little_endian, enforce_file_format=True)
    return buf.getvalue()
