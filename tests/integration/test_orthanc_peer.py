"""Issue 3: Orthanc as a real PACS. Orthanc holds the demo studies, pushes them to fedgate with its own
DICOMweb client (STOW-RS), and fedgate's QIDO answers are compared with Orthanc's own QIDO answers for
the same data; an instance retrieved from both carries the same dataset."""

from __future__ import annotations

import asyncio
import io

import pydicom
import requests

from tests.conftest import data_path
from tests.dicom_synth import ct_series, to_bytes
from tests.peers.orthanc import orthanc

STUDY_KEYS = ["0020000D", "00100020", "00100010", "00080020", "00080050", "00201206", "00201208"]
SERIES_KEYS = ["0020000E", "00080060", "00200011", "00201209"]
INSTANCE_KEYS = ["00080018", "00080016", "00200013"]


def _values(items: list[dict], keys: list[str]) -> list[tuple]:
    def v(item, k):
        val = item.get(k, {}).get("Value")
        if not val:
            return None
        x = val[0]
        if isinstance(x, dict):
            x = x.get("Alphabetic")
        return str(int(x)) if isinstance(x, (int, float)) or (isinstance(x, str) and x.isdigit()) else str(x)
    return sorted(tuple(v(i, k) for k in keys) for i in items)


def _qido(url: str, headers: dict | None = None) -> list[dict]:
    r = requests.get(url, headers=(headers or {}) | {"Accept": "application/dicom+json"}, timeout=30)
    r.raise_for_status()
    return r.json() if r.content else []


async def test_orthanc_pushes_to_fedgate_and_answers_agree(gateway, tmp_path):
    token = gateway.token("pacs")
    servers = {"fedgate": {"Url": gateway.dicomweb + "/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}}
    blobs = [p.read_bytes() for p in sorted(data_path("dicom").rglob("*.dcm"))]
    blobs += [to_bytes(d) for d in ct_series(patient_id="ORTH1", patient_name="Peer^Olga", n=5, size=64)]

    def run() -> tuple[list, list, list, list, list, list, bytes, bytes]:
        with orthanc(tmp_path / "orthanc", servers) as o:
            ids = set()
            for b in blobs:
                r = requests.post(o + "/instances", data=b, timeout=30)
                r.raise_for_status()
                ids.add(r.json()["ParentStudy"])
            r = requests.post(o + "/dicom-web/servers/fedgate/stow", json={"Resources": sorted(ids)}, timeout=120)
            assert r.ok, r.text
            h = {"Authorization": f"Bearer {gateway.token('clinician')}"}
            o_st, f_st = _qido(o + "/dicom-web/studies"), _qido(gateway.dicomweb + "/studies", h)
            o_se, f_se, o_in, f_in = [], [], [], []
            for s in o_st:
                uid = s["0020000D"]["Value"][0]
                o_se += _qido(f"{o}/dicom-web/studies/{uid}/series")
                f_se += _qido(f"{gateway.dicomweb}/studies/{uid}/series", h)
                o_in += _qido(f"{o}/dicom-web/studies/{uid}/instances")
                f_in += _qido(f"{gateway.dicomweb}/studies/{uid}/instances", h)
            inst = next(i for i in o_in if i["00080016"]["Value"][0] == "1.2.840.10008.5.1.4.1.1.2")
            st, se, sop = inst["0020000D"]["Value"][0], inst["0020000E"]["Value"][0], inst["00080018"]["Value"][0]
            path = f"/studies/{st}/series/{se}/instances/{sop}"
            accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
            o_bytes = requests.get(o + "/dicom-web" + path, headers=accept, timeout=30).content
            f_bytes = requests.get(gateway.dicomweb + path, headers=accept | h, timeout=30).content
            return o_st, f_st, o_se, f_se, o_in, f_in, o_bytes, f_bytes

    o_st, f_st, o_se, f_se, o_in, f_in, o_bytes, f_bytes = await asyncio.to_thread(run)
    assert len(o_st) >= 6
    assert _values(f_st, STUDY_KEYS) == _values(o_st, STUDY_KEYS)
    assert _values(f_se, SERIES_KEYS) == _values(o_se, SERIES_KEYS)
    assert _values(f_in, INSTANCE_KEYS) == _values(o_in, INSTANCE_KEYS)
    assert len(f_in) == len(blobs)

    def part(body: bytes) -> pydicom.Dataset:
        start = body.index(b"DICM") - 128
        return pydicom.dcmread(io.BytesIO(body[start:]))
    a, b = part(o_bytes), part(f_bytes)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData
    assert a.PatientName == b.PatientName and a.StudyDate == b.StudyDate
