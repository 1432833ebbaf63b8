"""Issue 22: WADO-RS content negotiation (PS3.18 §8.7) and compressed transfer syntaxes.

Compressed instances of every family (JPEG baseline / extended 12-bit / lossless, JPEG-LS, JPEG 2000, RLE)
come from pydicom's bundled test files (MIT-licensed with pydicom; see tests/integration/DATA.md). Expected
pixels are pydicom's own decoding of the same files (``Dataset.decompress`` / ``pixel_array``), never fedgate's.
Both engines (the ``gateway`` fixture is parametrised over SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

EXPLICIT_LE = "1.2.840.10008.1.2.1"

#: family -> pydicom test file
FAMILIES = {
    "jpeg-baseline-ybr": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg-extended-12bit": "JPGExtended.dcm",
    "jpeg-lossless-sv1": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg-ls-lossless": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg-ls-near-lossless": "JPEGLSNearLossless_16.dcm",
    "jpeg2000-lossless": "MR_small_jp2klossless.dcm",
    "jpeg2000": "JPEG2000.dcm",
    "rle-mono16": "MR_small_RLE.dcm",
    "rle-rgb-2frame": "SC_rgb_rle_2frame.dcm",
}
UNCOMPRESSED_MR = "MR_small.dcm"


def _fresh(name: str, study: str) -> pydicom.Dataset:
    """The test file with new UIDs (several are re-encodings of one MR with one SOP Instance UID)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "NEG1"
    return ds


def _expected(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's decoding, one array per frame (frames first)."""
    copy = pydicom.dcmread(io.BytesIO(_bytes(ds)))
    copy.decompress()
    arr = copy.pixel_array
    return arr if int(copy.get("NumberOfFrames") or 1) > 1 else arr[None]


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def _store(gw, files: dict) -> dict:
    client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs"))
    out = await asyncio.to_thread(client.store_instances, list(files.values()))
    assert "FailedSOPSequence" not in out
    return files


@pytest.fixture
async def stored(gateway):
    study = generate_uid()
    files = {fam: _fresh(name, study) for fam, name in FAMILIES.items()}
    files["uncompressed"] = _fresh(UNCOMPRESSED_MR, study)
    # the oracle for rendering: pydicom's decompression of each compressed file, stored as its own instance
    for fam in FAMILIES:
        d = pydicom.dcmread(io.BytesIO(_bytes(files[fam])))
        d.decompress()
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files[fam + "/decoded"] = d
    return await _store(gateway, files)


def _url(gw, ds, suffix: str = "") -> str:
    return (f"{gw.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{suffix}")


def _parts(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    out = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        out.append((head.decode().split(":", 1)[1].strip(), data[:-2]))
    return out


async def _get(http, gw, url, accept=None):
    headers = gw.headers("clinician")
    if accept is not None:
        headers["Accept"] = accept
    async with http.get(url, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


async def test_frames_decoded_and_as_stored(gateway, stored, http):
    """Default frames (octet-stream) are pydicom's decoding; transfer-syntax=* and the family's own media type
    give the stored compressed frames; retrieving the instance in the default syntax decodes it."""
    for fam in FAMILIES:
        ds = stored[fam]
        expected = _expected(ds)
        n = expected.shape[0]
        nums = ",".join(str(i + 1) for i in range(n))
        status, ctype, body = await _get(http, gateway, _url(gateway, ds, f"/frames/{nums}"))
        assert status == 200, (fam, body[:300])
        parts = _parts(body, ctype)
        assert [p[0] for p in parts] == [f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"] * n, fam
        for i, (_, data) in enumerate(parts):
            got = np.frombuffer(data, dtype=expected.dtype).reshape(expected[i].shape)
            assert np.array_equal(got, expected[i]), fam

        ts = str(ds.file_meta.TransferSyntaxUID)
        enc = list(generate_frames(ds.PixelData, number_of_frames=n))
        status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/frames/1"),
                                         'multipart/related; type="application/octet-stream"; transfer-syntax=*')
        assert status == 200 and _parts(body, ctype)[0] == (f"application/octet-stream; transfer-syntax={ts}", enc[0])
        client = DICOMwebClient(url=gateway.dicomweb, headers=gateway.headers("clinician"))
        media = {"jpeg": "image/jpeg", "jpeg-ls": "image/jls", "jpeg2000": "image/jp2", "rle": "image/x-dicom-rle"}
        kind = next(k for k in sorted(media, key=len, reverse=True) if fam.startswith(k))
        got = await asyncio.to_thread(client.retrieve_instance_frames, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                      ds.SOPInstanceUID, [1], media_types=((media[kind], ts),))
        assert got == [enc[0]], fam

        # the instance in the default transfer syntax (Explicit VR Little Endian): decoded
        status, ctype, body = await _get(http, gateway, _url(gateway, ds), 'multipart/related; type="application/dicom"')
        assert status == 200
        (ptype, data), = _parts(body, ctype)
        inst = pydicom.dcmread(io.BytesIO(data))
        assert ptype.endswith(EXPLICIT_LE) and inst.file_meta.TransferSyntaxUID == EXPLICIT_LE
        arr = inst.pixel_array
        assert np.array_equal(arr if n > 1 else arr[None], expected), fam
        # and as stored (dicomweb-client's default: transfer-syntax=*)
        inst = await asyncio.to_thread(client.retrieve_instance, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                       ds.SOPInstanceUID)
        assert inst.file_meta.TransferSyntaxUID == ts and inst.PixelData == ds.PixelData


async def test_render_compressed_matches_pydicom_decoding(gateway, stored, http):
    for fam in FAMILIES:
        outs = []
        for key in (fam, fam + "/decoded"):
            status, ctype, body = await _get(http, gateway, _url(gateway, stored[key], "/rendered"), "image/png")
            assert status == 200 and ctype == "image/png", (fam, body[:300])
            outs.append(np.asarray(Image.open(io.BytesIO(body))))
        assert np.array_equal(outs[0], outs[1]), fam
        status, _, body = await _get(http, gateway, _url(gateway, stored[fam], "/thumbnail"), "image/jpeg")
        assert status == 200 and body[:2] == b"\xff\xd8"


async def _jpeg_frames_are_real_jpeg_or_406(gateway, stored, http):
    jpeg = 'multipart/related; type="image/jpeg"'
    # stored JPEG baseline: the stored frame itself
    ds = stored["jpeg-baseline-ybr"]
    status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/frames/1"), jpeg)
    assert status == 200 and _parts(body, ctype)[0][1] == next(generate_frames(ds.PixelData, number_of_frames=1))
    # 8-bit RGB stored as RLE: encoded here; a JPEG that decodes close to pydicom's pixels
    ds = stored["rle-rgb-2frame"]
    status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/frames/2"), jpeg)
    assert status == 200
    (ptype, data), = _parts(body, ctype)
    assert ptype == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50" and data[:2] == b"\xff\xd8"
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    assert np.abs(img - _expected(ds)[1].astype(np.int16)).mean() < 4
    # 16-bit pixels cannot be JPEG baseline: 406, not raw bytes labelled image/jpeg
    for key in ("uncompressed", "jpeg-ls-lossless", "jpeg-extended-12bit"):
        status, _, _ = await _get(http, gateway, _url(gateway, stored[key], "/frames/1"), jpeg)
        assert status == 406, key
    # JPEG-LS cannot be produced from another syntax here: 406
    status, _, _ = await _get(http, gateway, _url(gateway, stored["rle-mono16"], "/frames/1"),
                              'multipart/related; type="image/jls"')
    assert status == 406
    # q-values: the better-liked producible type wins; unproducible ones are skipped
    status, ctype, body = await _get(
        http, gateway, _url(gateway, stored["uncompressed"], "/frames/1"),
        'multipart/related; type="image/jpeg"; q=0.9, multipart/related; type="application/octet-stream"; q=0.5')
    assert status == 200 and _parts(body, ctype)[0][0].startswith("application/octet-stream")


async def _encoded_frames_and_instances(gateway, stored, http):
    """JPEG 2000 lossless and RLE produced from uncompressed pixels decode (by pydicom) to the same pixels."""
    ds = stored["uncompressed"]
    for media, ts in (("image/jp2", "1.2.840.10008.1.2.4.90"), ("image/x-dicom-rle", "1.2.840.10008.1.2.5")):
        status, ctype, body = await _get(http, gateway, _url(gateway, ds),
                                         f'multipart/related; type="application/dicom"; transfer-syntax={ts}')
        assert status == 200
        (ptype, data), = _parts(body, ctype)
        got = pydicom.dcmread(io.BytesIO(data))
        assert got.file_meta.TransferSyntaxUID == ts and np.array_equal(got.pixel_array, ds.pixel_array)
        status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/frames/1"),
                                         f'multipart/related; type="{media}"')
        assert status == 200 and _parts(body, ctype)[0][0] == f"{media}; transfer-syntax={ts}"
    # a transfer syntax nothing here encodes: 406
    status, _, _ = await _get(http, gateway, _url(gateway, ds),
                              'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80')
    assert status == 406


async def _single_part_and_bulkdata(gateway, stored, http):
    ds = stored["uncompressed"]
    # single-part octet-stream frame (OHIF singlepart: 'pixeldata')
    status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/frames/1"), "application/octet-stream")
    assert status == 200 and ctype.startswith("application/octet-stream") and body == ds.PixelData
    status, _, _ = await _get(http, gateway, _url(gateway, stored["rle-rgb-2frame"], "/frames/1,2"),
                              "application/octet-stream")
    assert status == 406  # two frames do not fit a single part
    # single-part bulk data (OHIF singlepart: 'bulkdata') and the multipart default
    status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/bulkdata/7FE00010"), "application/octet-stream")
    assert status == 200 and ctype == "application/octet-stream" and body == ds.PixelData
    status, ctype, body = await _get(http, gateway, _url(gateway, ds, "/bulkdata/7FE00010"))
    assert status == 200 and ctype.startswith("multipart/related") and _parts(body, ctype)[0][1] == ds.PixelData
    status, _, _ = await _get(http, gateway, _url(gateway, ds, "/bulkdata/7FE00010"), "image/png")
    assert status == 406
    # single-part application/dicom for one instance
    status, ctype, body = await _get(http, gateway, _url(gateway, ds), "application/dicom")
    assert status == 200 and ctype.startswith("application/dicom")
    assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == ds.SOPInstanceUID


async def test_negotiation(gateway, stored, http):
    """image/jpeg frames are real JPEGs or 406; q-values; JPEG 2000 / RLE encoded here; single part; bulk data
    (one stored set: these share the fixture's STOW)."""
    await _jpeg_frames_are_real_jpeg_or_406(gateway, stored, http)
    await _encoded_frames_and_instances(gateway, stored, http)
    await _single_part_and_bulkdata(gateway, stored, http)


async def test_dicomweb_client_cli_media_type_jpeg(gateway, tmp_path):
    """dicomweb-client's CLI with --media-type image/jpeg saves a real JPEG, or fails on a 406."""
    study = generate_uid()
    stored = await _store(gateway, {"jpeg-baseline-ybr": _fresh(FAMILIES["jpeg-baseline-ybr"], study),
                                    "uncompressed": _fresh(UNCOMPRESSED_MR, study)})

    async def cli(ds, out):
        out.mkdir()
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "dicomweb_client"), "--url", gateway.dicomweb,
            "--bearer-token", gateway.token("clinician"), "retrieve", "instances",
            "--study", str(ds.StudyInstanceUID), "--series", str(ds.SeriesInstanceUID),
            "--instance", str(ds.SOPInstanceUID), "frames", "--numbers", "1", "--media-type", "image/jpeg",
            "--save", "--output-dir", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        return proc.returncode, err.decode(), sorted(out.iterdir())

    rc, err, files = await cli(stored["jpeg-baseline-ybr"], tmp_path / "a")
    assert rc == 0, err
    [f] = files
    assert f.suffix == ".jpg" and Image.open(f).format == "JPEG"
    rc, err, files = await cli(stored["uncompressed"], tmp_path / "b")
    assert rc != 0 and "406" in err and not files
