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
    """A CT instance (explicit VR LE) with a ContentSequence nested ``depth`` levels deep, written as raw
    undefined-length sequences (no recursion: any depth) just before the pixel data."""
    data = to_bytes(ct())
    at = data.index(b"\xe0\x7f\x10\x00OW")
    seq = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"  # (0040,A730) SQ, undefined length
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    end_item = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    end_seq = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    code = b"\x08\x00\x00\x01SH\x02\x00X "  # (0008,0100) CodeValue
    body = (seq + item) * depth + code + (end_item + end_seq) * depth
    return data[:at] + body + data[at:]


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


# ------------------------------------------------------------------------------------------ mutation fuzzing
#: explicit VR codes a mutation may put in place of another
VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
       b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
       b"UR", b"US", b"UT", b"UV"]


def _vr_positions(data: bytes) -> list[int]:
    """Offsets of (what look like) explicit VR codes after the file meta (tag of an even group, 2 letters)."""
    out = []
    for vr in VRS:
        start = 132
        while (at := data.find(vr, start)) >= 0:
            start = at + 1
            if at >= 136 and data[at - 4] % 2 == 0 and data[at - 3] < 0x80:
                out.append(at)
    return sorted(out)


def mutate(data: bytes, rng) -> tuple[str, bytes]:
    """One mutant of a Part 10 file: (what was done, bytes). ``rng``: a random.Random (seeded by the caller)."""
    kind = rng.choice(["truncate", "flip", "vr", "length", "nest", "flip-header"])
    if kind == "truncate":
        cut = rng.randrange(0, len(data))
        return f"truncated at {cut}", data[:cut]
    if kind in ("flip", "flip-header"):
        out = bytearray(data)
        hi = min(len(out), 1024) if kind == "flip-header" else len(out)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(128, hi) if hi > 128 else rng.randrange(0, len(out))
            out[at] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    positions = _vr_positions(data)
    if kind == "vr" and positions:
        at = rng.choice(positions)
        return f"VR at {at} re-coded", data[:at] + rng.choice(VRS) + data[at + 2:]
    if kind == "length" and positions:
        at = rng.choice(positions)
        vr = data[at:at + 2]
        if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"):
            huge = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(data) * 4, 0xFFFFFFFE])
            return f"huge 4-byte length at {at}", data[:at + 4] + huge.to_bytes(4, "little") + data[at + 8:]
        huge = rng.choice([0xFFFF, 0xFFFE, 0x8001])
        return f"huge 2-byte length at {at}", data[:at + 2] + huge.to_bytes(2, "little") + data[at + 4:]
    depth = rng.choice([33, 64, 200, 1000, 5000])
    return f"nested {depth} deep", nested(depth)
