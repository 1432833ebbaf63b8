"""Issue 25: the DIMSE listener against peers that are not fedgate — DCMTK's echoscu/storescu/findscu/movescu/
getscu and Orthanc as the C-MOVE destination. C-STORE goes through the STOW-RS ingest (the stored bytes are what
was sent), C-FIND answers what QIDO-RS answers for the same keys and the same requester, C-MOVE/C-GET deliver
identical copies, an analyst AE sees and moves only the studies its purpose permits, an unknown AE is rejected
and audited, and bad input (a malformed PDU, an association aborted mid-transfer, a data set that does not
parse) stores nothing and leaves the listener serving."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import orjson
import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage

from gateway import keys
from tests.conftest import Gateway, data_path, make_settings
from tests.dicom_synth import ct_series
from tests.integration.test_audit_refusals import _events
from tests.integration.test_consent_enforcement import consent, patient
from tests.peers.orthanc import orthanc
from tests.procs import free_port

FHIR_JSON = {"Content-Type": "application/fhir+json"}
GRU = {"codes": ["DUO:0000042"]}
STUDY_KEYS = ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]


@pytest.fixture
async def site(tmp_path, db_url):
    from aiohttp.test_utils import TestServer
    from gateway.app import create_app

    dimse, orthanc_dimse = free_port(), free_port()
    peers = {"PACS1": {"role": "pacs"}, "RES1": {"role": "analyst", "purpose": "DUO:0000042"},
             "ORTHANC": {"role": "pacs", "host": "127.0.0.1", "port": orthanc_dimse},
             "ELSEWHERE": {"role": "pacs", "host": "10.255.255.1"}}
    settings = make_settings(tmp_path / "data", db_url, dimse_port=dimse, extra={"dimse_peers": peers})
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        yield Gateway(server, settings), dimse, orthanc_dimse
    finally:
        await server.close()


def _scu(tool: str, port: int, *args: str, aet: str = "PACS1", timeout: float = 120,
         files: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([tool, "-aet", aet, "-aec", "FEDGATE", *args, "127.0.0.1", str(port), *files],
                          capture_output=True, text=True, timeout=timeout)


def _dataset_bytes(data: bytes) -> tuple[str, bytes]:
    """(transfer syntax, the encoded data set after the file meta) of a PS3.10 file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    f = io.BytesIO(data)
    read_preamble(f, False)
    meta = _read_file_meta_info(f)
    return str(meta.TransferSyntaxUID), data[f.tell():]


def _same(got: bytes, sent: bytes, name: str) -> None:
    """The stored/copied instance is the one sent: the same encoded data set, byte for byte — or, where the
    sending tool re-encoded it on the wire (DCMTK re-encodes some sequences, drops trailing padding), the same
    data set (in the transfer syntax the receiving peer accepted)."""
    (_, a), (_, b) = _dataset_bytes(got), _dataset_bytes(sent)
    if a == b:
        return
    da, db = pydicom.dcmread(io.BytesIO(got)), pydicom.dcmread(io.BytesIO(sent))
    db.pop(0xFFFCFFFC, None)  # Data Set Trailing Padding: storescu does not send it (PS3.10 7.2 allows that)
    def items(ds):  # group lengths are retired (PS3.5 7.2): receivers drop or recompute them
        return [(e.tag, e.value) for e in ds if e.tag.element != 0]
    assert items(da) == items(db), name  # (a C-GET peer may accept another transfer syntax than the stored one)


def _find(port: int, level: str, keys_: list[str], tmp: Path, aet: str = "PACS1", model: str = "-S",
          *options: str) -> list[pydicom.Dataset]:
    out = tmp / f"find-{aet}-{level}-{len(list(tmp.glob('find-*')))}"
    out.mkdir()
    args = [model, *options, "-X", "-od", str(out), "-k", f"QueryRetrieveLevel={level}"]
    for k in keys_:
        args += ["-k", k]
    r = _scu("findscu", port, *args, aet=aet)
    assert r.returncode == 0, r.stderr
    return [pydicom.dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]


def _value(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, dict):
        v = v.get("Alphabetic", "")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def _from_find(items: list[pydicom.Dataset], kws: list[str]) -> list[tuple]:
    def one(d, k):
        e = d.data_element(k)
        if e is None or e.value in (None, ""):
            return ""
        return str(e.value[0] if isinstance(e.value, pydicom.multival.MultiValue) else e.value)
    return sorted(tuple(one(d, k) for k in kws) for d in items)


def _from_qido(items: list[dict], kws: list[str]) -> list[tuple]:
    tags = [f"{pydicom.datadict.tag_for_keyword(k):08X}" for k in kws]
    return sorted(tuple(_value((i.get(t, {}).get("Value") or [""])[0]) for t in tags) for i in items)


async def _qido(http, url, headers, **params) -> list[dict]:
    async with http.get(url, params=params, headers=headers | {"Accept": "application/dicom+json"}) as r:
        assert r.status == 200, await r.text()
        return await r.json() if r.content_length != 0 else []


async def _wado(http, gw: Gateway, st: str, se: str, sop: str) -> bytes:
    accept = {"Accept": "application/dicom; transfer-syntax=*"}
    async with http.get(f"{gw.dicomweb}/studies/{st}/series/{se}/instances/{sop}",
                        headers=gw.headers("clinician") | accept) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def test_dcmtk_and_orthanc_peers(site, tmp_path):
    gw, port, orthanc_port = site
    files = sorted(data_path("dicom").rglob("*.dcm"))
    syn = tmp_path / "syn"
    syn.mkdir()
    for pid in ("p-gru", "p-none"):
        for ds in ct_series(patient_id=pid, patient_name=f"Test^{pid}", n=3, size=32, accession=pid):
            path = syn / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    async with aiohttp.ClientSession() as http:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in (patient("p-gru"), patient("p-none"), consent("p-gru", ["DUO:0000042"], [], {}))]}
        async with http.post(gw.fhir, json=bundle, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 200, await r.text()

        # C-ECHO; an unknown calling AE title and a known one from another address are rejected
        assert (await asyncio.to_thread(_scu, "echoscu", port)).returncode == 0
        refused = await asyncio.to_thread(_scu, "echoscu", port, aet="STRANGER")
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
        assert (await asyncio.to_thread(_scu, "echoscu", port, aet="ELSEWHERE")).returncode != 0

        # C-STORE of the demo data and a synthetic series; every instance stored as sent
        r = await asyncio.to_thread(_scu, "storescu", port, "-R", files=tuple(map(str, files)))
        assert r.returncode == 0, r.stderr
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            got = await _wado(http, gw, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            _same(got, f.read_bytes(), f.name)
        # storing the same again: B000-style warning (identical), still exit 0; nothing duplicated
        again = await asyncio.to_thread(_scu, "storescu", port, "-R", files=(str(files[0]),))
        assert again.returncode == 0, again.stderr

        # C-FIND = QIDO-RS for the same keys (study, series, instance levels; Study and Patient Root)
        pacs_h = gw.headers("pacs")
        finds = await asyncio.to_thread(_find, port, "STUDY", STUDY_KEYS, tmp_path)
        assert _from_find(finds, STUDY_KEYS) == _from_qido(await _qido(http, f"{gw.dicomweb}/studies", pacs_h),
                                                           STUDY_KEYS)
        assert len(finds) >= 8
        keys_ = ["StudyInstanceUID", "PatientID=p-*", "PatientName", "StudyDate"]
        finds = await asyncio.to_thread(_find, port, "STUDY", keys_, tmp_path, "PACS1", "-P")
        qido = await _qido(http, f"{gw.dicomweb}/studies", pacs_h, PatientID="p-*")
        assert _from_find(finds, ["StudyInstanceUID", "PatientID"]) == _from_qido(qido, ["StudyInstanceUID", "PatientID"])
        assert len(finds) == 2
        gru_study = next(d.StudyInstanceUID for d in finds if d.PatientID == "p-gru")
        none_study = next(d.StudyInstanceUID for d in finds if d.PatientID == "p-none")
        se_keys = ["SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
        finds = await asyncio.to_thread(_find, port, "SERIES", se_keys + [f"StudyInstanceUID={gru_study}"], tmp_path)
        qido = await _qido(http, f"{gw.dicomweb}/studies/{gru_study}/series", pacs_h)
        assert _from_find(finds, se_keys) == _from_qido(qido, se_keys) and len(finds) == 1
        in_keys = ["SOPInstanceUID", "SOPClassUID", "InstanceNumber"]
        finds = await asyncio.to_thread(_find, port, "IMAGE", in_keys + [f"StudyInstanceUID={gru_study}",
                                                                         "SeriesInstanceUID"], tmp_path)
        qido = await _qido(http, f"{gw.dicomweb}/studies/{gru_study}/instances", pacs_h)
        assert _from_find(finds, in_keys) == _from_qido(qido, in_keys) and len(finds) == 3
        patients = await asyncio.to_thread(_find, port, "PATIENT", ["PatientID=p-gru", "PatientName",
                                                                    "NumberOfPatientRelatedStudies"], tmp_path, "PACS1", "-P")
        assert [(p.PatientID, int(p.NumberOfPatientRelatedStudies)) for p in patients] == [("p-gru", 1)]

        # the analyst AE (purpose GRU) sees exactly what QIDO-RS shows an analyst token with that purpose
        finds = await asyncio.to_thread(_find, port, "STUDY", STUDY_KEYS, tmp_path, "RES1")
        qido = await _qido(http, f"{gw.dicomweb}/studies", gw.headers("analyst", purpose=GRU))
        assert _from_find(finds, STUDY_KEYS) == _from_qido(qido, STUDY_KEYS)
        assert {d.StudyInstanceUID for d in finds} == {gru_study}

        # C-MOVE to Orthanc: the copies are identical; the analyst cannot move the refused study
        ct = next(f for f in files if f.parent.name == "ct-3slice")
        ct_ds = pydicom.dcmread(ct, stop_before_pixels=True)

        (pushed,) = ct_series(patient_id="p-orthanc", patient_name="Pushed^By^Orthanc", n=1, size=32)
        pushed_bytes = io.BytesIO()
        pydicom.dcmwrite(pushed_bytes, pushed, enforce_file_format=True)

        def moves() -> tuple[list, list, str, str, str]:
            modalities = {"fedgate": ["FEDGATE", "127.0.0.1", port]}
            with orthanc(tmp_path / "orthanc", dicom_port=orthanc_port, modalities=modalities) as o:
                # Orthanc as a modality: its C-STORE SCU (calling AE ORTHANC) through its REST API
                iid = requests.post(o + "/instances", data=pushed_bytes.getvalue(), timeout=30).json()["ID"]
                r0 = requests.post(o + "/modalities/fedgate/store", json={"Resources": [iid], "Synchronous": True},
                                   timeout=60)
                assert r0.ok, r0.text
                requests.delete(f"{o}/instances/{iid}", timeout=10)
                r1 = _scu("movescu", port, "-S", "-aem", "ORTHANC", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={ct_ds.StudyInstanceUID}")
                got = {}
                for iid in requests.get(o + "/instances", timeout=10).json():
                    tags = requests.get(f"{o}/instances/{iid}/simplified-tags", timeout=10).json()
                    got[tags["SOPInstanceUID"]] = requests.get(f"{o}/instances/{iid}/file", timeout=10).content
                r2 = _scu("movescu", port, "-S", "-aem", "ORTHANC", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={none_study}", aet="RES1")
                r3 = _scu("movescu", port, "-S", "-aem", "ORTHANC", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={gru_study}", aet="RES1")
                after = [requests.get(f"{o}/instances/{i}/simplified-tags", timeout=10).json()["StudyInstanceUID"]
                         for i in requests.get(o + "/instances", timeout=10).json()]
                return got, after, r1.stderr + r2.stderr + r3.stderr, str(r1.returncode), str(r2.returncode)

        got, after, err, rc1, rc2 = await asyncio.to_thread(moves)
        assert rc1 == "0" and rc2 == "0", err
        ct_files = [f for f in files
                    if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == ct_ds.StudyInstanceUID]
        assert len(got) == len(ct_files)
        for f in ct_files:
            sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            _same(got[sop], f.read_bytes(), f.name)
        assert none_study not in after and gru_study in after
        got_pushed = await _wado(http, gw, pushed.StudyInstanceUID, pushed.SeriesInstanceUID, pushed.SOPInstanceUID)
        _same(got_pushed, pushed_bytes.getvalue(), "pushed by Orthanc")

        # C-GET of the same study: identical files back over the same association
        out = tmp_path / "get"
        out.mkdir()
        r = await asyncio.to_thread(_scu, "getscu", port, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", f"StudyInstanceUID={ct_ds.StudyInstanceUID}")
        assert r.returncode == 0, r.stderr
        fetched = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.read_bytes() for p in out.iterdir()}
        assert len(fetched) == len(ct_files)
        for f in ct_files:
            sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            _same(fetched[sop], f.read_bytes(), f.name)
        r = await asyncio.to_thread(_scu, "getscu", port, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", f"StudyInstanceUID={none_study}", aet="RES1")
        assert len(list(out.iterdir())) == len(ct_files)  # nothing of the refused study

    # every association refusal is audited
    await gw.app[keys.AUDIT].flush()
    events = await _events(gw.settings)
    refusals = [e for e in events if e["subtype"][0]["code"] == "dimse-association"]
    assert len(refusals) == 2 and all(e["outcome"] == "4" for e in refusals)
    assert "STRANGER" in orjson.dumps(refusals).decode()


def _assoc(port: int, aet: str = "PACS1"):
    ae = AE(aet)
    ae.add_requested_context(CTImageStorage, [pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDGATE")
    assert assoc.is_established
    return assoc


def _store_message(ds_bytes: bytes, sop: str):
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, sop
    req.DataSet = io.BytesIO(ds_bytes)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return msg


def _answers(items) -> list[dict]:
    """Response identifiers as comparable values (every element, as decoded)."""
    return sorted(({e.keyword or str(e.tag): str(e.value) for e in d} for d in items), key=lambda d: sorted(d.items()))


async def test_find_answers_alike_in_every_transfer_syntax_to_every_scu_and_cancel(site, tmp_path):
    """The pending responses the listener writes itself: the same identifiers whether the context's transfer
    syntax is implicit or explicit little endian (written from the QIDO-RS rows), explicit big endian or
    deflated (written by pydicom), to DCMTK and to pynetdicom as the SCU; a C-CANCEL ends the find (early,
    FE00, or — arriving after the last match was sent — with its final status) and the association goes on."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    gw, port, _ = site
    files = []
    for i in range(4):
        for ds in ct_series(patient_id=f"p-ts{i}", patient_name=f"Tränsfer^Sýntax{i}", n=1, size=16,
                            accession=f"TS{i}"):
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(str(path))
    r = await asyncio.to_thread(_scu, "storescu", port, files=tuple(files))
    assert r.returncode == 0, r.stderr
    keys_ = STUDY_KEYS + ["RetrieveAETitle", "InstanceAvailability", "ModalitiesInStudy", "StudyTime"]
    reference = await asyncio.to_thread(_find, port, "STUDY", keys_, tmp_path)
    assert len(reference) == 4 and {str(d.PatientName) for d in reference} == {f"Tränsfer^Sýntax{i}" for i in range(4)}
    assert {(d.RetrieveAETitle, d.InstanceAvailability, d.SpecificCharacterSet) for d in reference} == {
        ("FEDGATE", "ONLINE", "ISO_IR 192")}
    for option in ("-xi", "-xe", "-xb", "-xd"):
        got = await asyncio.to_thread(_find, port, "STUDY", keys_, tmp_path, "PACS1", "-S", option)
        assert _answers(got) == _answers(reference), option

    def pynetdicom_find() -> tuple[list, list]:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(FIND)
        assoc = ae.associate("127.0.0.1", port, ae_title="FEDGATE")
        assert assoc.is_established
        try:
            ident = pydicom.Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            for k in keys_:
                setattr(ident, k, "")
            answers, statuses = [], []
            for status, identifier in assoc.send_c_find(ident, FIND):
                statuses.append(status.Status)
                if identifier is not None:
                    answers.append(identifier)
            return answers, statuses
        finally:
            assoc.release()

    answers, statuses = await asyncio.to_thread(pynetdicom_find)
    assert statuses == [0xFF00] * 4 + [0x0000]
    assert _answers(answers) == _answers(reference)

    # C-CANCEL after the first response; then the next find on the same association is whole
    r = await asyncio.to_thread(_scu, "findscu", port, "-S", "-v", "--cancel", "1", "--repeat", "2",
                                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert r.returncode == 0 and "Sending Cancel Request (MsgID 1" in r.stderr, r.stderr
    first, second = r.stderr.split("Sending Find Request (MsgID 2")
    assert ("Received Final Find Response (Success)" in first
            or "Received Final Find Response (Matching terminated due to Cancel request)" in first), first
    assert second.count("(Pending)") == 4 and "Received Final Find Response (Success)" in second, second


async def test_bad_input_stores_nothing_and_the_listener_keeps_serving(site, tmp_path):
    gw, port, _ = site
    (good, cut, junk) = ct_series(patient_id="p-bad", patient_name="Bad^Input", n=3, size=128)

    def bad_peers() -> list[int]:
        # a malformed PDU: not an A-ASSOCIATE-RQ at all
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x42\x00" + b"\xff" * 64)
            try:
                s.recv(1024)
            except OSError:
                pass
        # an association aborted in the middle of a C-STORE's data set
        assoc = _assoc(port)
        raw = io.BytesIO()
        pydicom.dcmwrite(raw, cut, enforce_file_format=True)
        _, body = _dataset_bytes(raw.getvalue())
        cx = assoc.accepted_contexts[0]
        pdus = list(_store_message(body, cut.SOPInstanceUID).encode_msg(cx.context_id, 4096))
        for p in pdus[: len(pdus) // 2]:
            assoc.dul.send_pdu(p)
        assoc.abort()
        # a data set that does not parse: C000, nothing stored (sent as the raw bytes after a valid file meta)
        from pydicom.filewriter import write_file_meta_info
        from pynetdicom import _config

        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, junk.SOPInstanceUID
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        buf = io.BytesIO()
        buf.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)
        buf.write(b"\x08\x00\x16\x00\x40\x00\x00\x00" + b"\x01" * 16)  # (0008,0016) claims 64 bytes, 16 follow
        bad = tmp_path / "junk.dcm"
        bad.write_bytes(buf.getvalue())
        assoc = _assoc(port)
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            rsp = assoc.send_c_store(bad)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
        # an analyst AE may not store (0124, audited)
        assoc = _assoc(port, "RES1")
        refused = assoc.send_c_store(good)
        assoc.release()
        # and a good one still stores
        assoc = _assoc(port)
        status = assoc.send_c_store(good)
        assoc.release()
        return [rsp.Status, status.Status, refused.Status]

    statuses = await asyncio.to_thread(bad_peers)
    assert statuses[0] & 0xF000 == 0xC000 and statuses[1] == 0x0000 and statuses[2] == 0x0124
    assert (await asyncio.to_thread(_scu, "echoscu", port)).returncode == 0
    async with aiohttp.ClientSession() as http:
        found = await _qido(http, f"{gw.dicomweb}/instances", gw.headers("pacs"), PatientID="p-bad")
    assert [i["00080018"]["Value"][0] for i in found] == [good.SOPInstanceUID]
    await asyncio.sleep(0.2)
    tmp = gw.settings.blob_dir / "tmp"
    assert not list(tmp.glob("*.part"))  # no temp file of the aborted or refused instances left behind
    stored = [p for p in gw.settings.blob_dir.rglob("*") if p.is_file() and p.parent != tmp]
    assert len(stored) == 1  # the good instance's file only: nothing partial


async def test_kill9_during_storescu_keeps_every_acknowledged_instance(tmp_path, db_url):
    """kill -9 of the gateway while ``storescu`` sends 500 instances: after a restart every instance answered
    0000 is stored as sent, and there is no file without its index row and no temp file."""
    import os
    import random
    import signal
    import sys

    from tests.conftest import REPO
    from tests.integration.federation_fixtures import start_gateway_process
    from tests.integration.test_dicomweb_bad_input import _blob_rows
    from tests.procs import wait_ready

    rng = random.Random(int(os.environ.get("FEDGATE_KILL_SEED", "25")))
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for s in range(5):
        for ds in ct_series(patient_id=f"K9-{s}", patient_name="Kill^Nine", n=100, size=64):
            path = src / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    dimse = free_port()
    toml = f'dimse_port = {dimse}\n[dimse_peers.PACS1]\nrole = "pacs"\n'
    gw = await start_gateway_process(tmp_path, "k9", toml, db_url=db_url)
    blobs = gw.settings.data_dir / "blobs"
    log = tmp_path / "storescu.log"
    try:
        with open(log, "w") as out:
            scu = subprocess.Popen(["storescu", "-v", "-aet", "PACS1", "-aec", "FEDGATE", "127.0.0.1", str(dimse),
                                    *map(str, files)], stdout=out, stderr=subprocess.STDOUT)
            for _ in range(600):  # the first answer (the process's first parse starts its worker pool)
                if "Received Store Response" in log.read_text() or scu.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            os.kill(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait(10)
            await asyncio.to_thread(scu.wait, 60)
        acked = log.read_text().count("Received Store Response (Success)")
        assert 0 < acked < len(files), f"{acked} of {len(files)} acknowledged before the kill"
        env = dict(os.environ, FEDGATE_CONFIG=str(gw.settings.data_dir / "site.toml"))
        gw.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_ready(gw.url, gw.proc, timeout=60)
        disk = {p.relative_to(blobs).as_posix() for p in blobs.rglob("*.dcm") if p.relative_to(blobs).parts[0] != "tmp"}
        assert not list((blobs / "tmp").glob("*.part"))
        assert disk == await _blob_rows(gw.settings.database_url), "files and index rows differ after restart"
        async with aiohttp.ClientSession() as http:
            for f in files[:acked]:  # storescu sends the files in order, one at a time
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                _same(await _wado(http, gw, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
                      f.read_bytes(), f.name)
    finally:
        gw.stop()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_listener(tmp_path, db_url):
    """PS3.15 Annex B: with a certificate configured the listener speaks TLS only."""
    from aiohttp.test_utils import TestServer
    from gateway.app import create_app

    cert, key = _self_signed(tmp_path)
    port = free_port()
    settings = make_settings(tmp_path / "data", db_url, dimse_port=port, dimse_tls_cert=str(cert),
                             dimse_tls_key=str(key), extra={"dimse_peers": {"PACS1": {"role": "pacs"}}})
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        tls = await asyncio.to_thread(_scu, "echoscu", port, "+tla", "+cf", str(cert), timeout=30)
        assert tls.returncode == 0, tls.stderr
        plain = await asyncio.to_thread(_scu, "echoscu", port, "-to", "5", "-ta", "5", timeout=30)
        assert plain.returncode != 0
    finally:
        await server.close()


def _serving_children(parent: int) -> list[int]:
    """The serving processes of a ``fedgate serve`` parent (``--serve-child`` on their command line)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"--serve-child" in cmd:
            out.append(int(d.name))
    return out


def _holding(pids: list[int], port: int) -> set[int]:
    """Which of ``pids`` hold an established TCP connection whose local port is ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    held = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    held.add(pid)
                    break
            except OSError:
                continue
    return held


async def test_associations_spread_over_the_serving_processes(tmp_path, db_url):
    """``fedgate serve --processes 2``: the parent accepts on the DIMSE port and hands each association to a
    serving process; four parallel ``storescu`` land in both, every instance acknowledged is retrievable
    byte-identical, and ``dimse_max_associations`` holds for all processes together (one more association is
    rejected, "local limit exceeded"; after a release there is room again)."""
    from tests.integration.federation_fixtures import start_gateway_process

    sources = []
    for s in range(4):
        src = tmp_path / f"src{s}"
        src.mkdir()
        files = []
        for ds in ct_series(patient_id=f"MP-{s}", patient_name="Multi^Process", n=40, size=64):
            path = src / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        sources.append(files)
    dimse = free_port()
    toml = f'dimse_port = {dimse}\ndimse_max_associations = 4\n[dimse_peers.PACS1]\nrole = "pacs"\n'
    gw = await start_gateway_process(tmp_path, "mp", toml, db_url=db_url, args=("--processes", "2"))
    try:
        children = _serving_children(gw.proc.pid)
        assert len(children) == 2, children
        logs = [tmp_path / f"storescu{i}.log" for i in range(4)]
        outs = [open(log, "w") for log in logs]
        try:
            scus = [subprocess.Popen(["storescu", "-v", "-aet", "PACS1", "-aec", "FEDGATE", "127.0.0.1", str(dimse),
                                      *map(str, files)], stdout=out, stderr=subprocess.STDOUT)
                    for files, out in zip(sources, outs)]
            held: set[int] = set()
            while any(p.poll() is None for p in scus):
                held |= _holding(children, dimse)
                await asyncio.sleep(0.02)
        finally:
            for out in outs:
                out.close()
        for p, log in zip(scus, logs):
            assert p.returncode == 0, log.read_text()[-2000:]
        assert held == set(children), f"associations held by {sorted(held)} of the serving processes {children}"
        for files, log in zip(sources, logs):
            assert log.read_text().count("Received Store Response (Success)") == len(files)
        async with aiohttp.ClientSession() as http:
            for files in sources:
                for f in files:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                    _same(await _wado(http, gw, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
                          f.read_bytes(), f.name)

        def limit() -> tuple[bool, tuple, bool]:
            time.sleep(0.5)  # (the serving processes report the storescu associations' end)
            open_ = [_assoc(dimse) for _ in range(4)]
            assert _holding(children, dimse) == set(children)  # the four are spread too
            ae = AE("PACS1")
            ae.add_requested_context(CTImageStorage)
            extra = ae.associate("127.0.0.1", dimse, ae_title="FEDGATE")
            rejected = extra.is_rejected
            prim = extra.acceptor.primitive
            why = (prim.result, prim.result_source, prim.diagnostic) if prim is not None else ()
            open_[0].release()
            time.sleep(0.5)
            again = ae.associate("127.0.0.1", dimse, ae_title="FEDGATE")
            room = again.is_established
            for a in [*open_[1:], again]:
                if a.is_established:
                    a.release()
            return rejected, why, room

        rejected, why, room = await asyncio.to_thread(limit)
        assert rejected and why == (0x02, 0x03, 0x02), why  # rejected-transient, local limit exceeded
        assert room
    finally:
        gw.stop()


async def test_tls_listener_in_serving_processes(tmp_path, db_url):
    """With ``--processes 2`` the parent accepts plain TCP and each serving process does the TLS handshake of
    the connections it is handed: TLS peers are served, plain ones are not."""
    from tests.integration.federation_fixtures import start_gateway_process

    cert, key = _self_signed(tmp_path)
    port = free_port()
    toml = (f'dimse_port = {port}\ndimse_tls_cert = "{cert}"\ndimse_tls_key = "{key}"\n'
            '[dimse_peers.PACS1]\nrole = "pacs"\n')
    gw = await start_gateway_process(tmp_path, "tls", toml, db_url=db_url, args=("--processes", "2"))
    try:
        for _ in range(2):  # (two in a row: the second goes to the other serving process, the longer unused)
            tls = await asyncio.to_thread(_scu, "echoscu", port, "+tla", "+cf", str(cert), timeout=30)
            assert tls.returncode == 0, tls.stderr
        plain = await asyncio.to_thread(_scu, "echoscu", port, "-to", "5", "-ta", "5", timeout=30)
        assert plain.returncode != 0
        tls = await asyncio.to_thread(_scu, "echoscu", port, "+tla", "+cf", str(cert), timeout=30)
        assert tls.returncode == 0, tls.stderr  # a failed handshake leaves the listener serving
    finally:
        gw.stop()
