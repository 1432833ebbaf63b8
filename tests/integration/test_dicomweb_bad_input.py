"""Issue 3: bad STOW/WADO input → PS3.18 status + failure reasons, nothing partial stored; and the blob
store's crash safety (a real server process killed mid-STOW, then restarted)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import func, select

from gateway import keys
from gateway.store.dicom_schema import dcm_instance
from tests.conftest import make_settings, start_gateway
from tests.dicom_synth import ct_series, to_bytes
from tests.procs import free_port, wait_ready

BOUNDARY = "fedgateTESTboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _body(*parts: bytes, ctype: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _reasons(body: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in body.get("00081198", {}).get("Value", [])]


@pytest.fixture
async def small(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, max_instance_bytes=200_000,
                                           max_stow_bytes=3_000_000))
    try:
        yield gw
    finally:
        await gw.server.close()


async def _state(gw) -> tuple[int, int, int]:
    async with gw.app[keys.DB].read() as conn:
        rows = (await conn.execute(select(func.count()).select_from(dcm_instance))).scalar_one()
    blobs = Path(gw.settings.data_dir) / "blobs"
    files = sum(1 for p in blobs.rglob("*.dcm"))
    tmp = sum(1 for _ in (blobs / "tmp").glob("*"))
    return rows, files, tmp



async def _no_temp_files(gw, before) -> tuple[int, int, int]:
    """The store's state once the writer threads are done (a failed request's part files are removed
    when their writer thread has finished with them)."""
    for _ in range(100):
        state = await _state(gw)
        if state == before:
            break
        await asyncio.sleep(0.02)
    return state


async def test_failed_requests_leave_no_temp_files(small, http):
    """Parts already handed to the writer threads when the request fails (body cut inside a later part,
    a requester who may not store) or is abandoned leave no temp file behind."""
    gw = small
    h = gw.headers("pacs")
    parts = [to_bytes(d) for d in ct_series(patient_id="T1", patient_name="Temp^Files", n=3, size=64)]
    before = await _state(gw)
    cut = _body(*parts)[: -len(parts[-1]) // 2]  # the last part never ends
    async with http.post(f"{gw.dicomweb}/studies", data=cut, headers=h | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 400
    assert await _no_temp_files(gw, before) == before
    analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]})
    async with http.post(f"{gw.dicomweb}/studies", data=_body(*parts), headers=analyst | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 403
    assert await _no_temp_files(gw, before) == before
    async with http.post(f"{gw.dicomweb}/studies", data=_body(*parts), headers=h | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 200
    assert (await _state(gw))[2] == 0

async def test_stow_bad_input_table(small, http):
    gw = small
    h = gw.headers("pacs")
    good = ct_series(patient_id="B1", patient_name="Bad^Input", n=3, size=32)
    big = ct_series(patient_id="B2", patient_name="Big^Part", n=1, size=512)[0]
    good_bytes = [to_bytes(d) for d in good]
    await_ok = await http.post(f"{gw.dicomweb}/studies", data=_body(good_bytes[0]), headers=h | {"Content-Type": DICOM_MP})
    assert await_ok.status == 200
    truncated = good_bytes[1][: len(good_bytes[1]) // 2]
    changed = good[0].copy()
    changed.PatientName = "Changed^Content"
    other_study = "1.2.3.4.5.6.7"
    cases = [
        # (case, path, content-type, body, status, failure reasons)
        ("not DICOM", "/studies", DICOM_MP, _body(b"this is not a DICOM file" * 10), 409, [0xC000]),
        ("truncated file", "/studies", DICOM_MP, _body(truncated), 409, [0xC000]),
        ("wrong study UID in path", f"/studies/{other_study}", DICOM_MP, _body(good_bytes[1]), 409, [0xA900]),
        ("part too large", "/studies", DICOM_MP, _body(to_bytes(big)), 409, [0xA700]),
        ("part of another media type", "/studies", DICOM_MP, _body(b"{}", ctype="application/json"), 409, [0xC000]),
        ("different instance, same SOP UID", "/studies", DICOM_MP, _body(to_bytes(changed)), 409, [0x0111]),
        ("missing boundary", "/studies", 'multipart/related; type="application/dicom"', _body(good_bytes[1]), 400, None),
        ("not multipart", "/studies", "application/dicom", good_bytes[1], 415, None),
        ("dicom+json parts", "/studies", f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
         _body(b"[]"), 415, None),
        ("garbage multipart", "/studies", DICOM_MP, b"no boundary lines at all", 400, None),
        ("request too large", "/studies", DICOM_MP, _body(*[to_bytes(big)] * 6), 413, None),
        ("bad study UID in path", "/studies/not-a-uid", DICOM_MP, _body(good_bytes[1]), 400, None),
    ]
    before = await _state(gw)
    failures = []
    for case, path, ctype, body, status, reasons in cases:
        async with http.post(gw.dicomweb + path, data=body, headers=h | {"Content-Type": ctype}) as r:
            text = await r.text()
            if r.status != status:
                failures.append(f"{case}: {r.status} {text[:200]}")
            elif reasons is not None:
                got = _reasons(await r.json())
                if got != reasons:
                    failures.append(f"{case}: reasons {got} != {reasons}")
            elif r.content_type != "application/problem+json":
                failures.append(f"{case}: error not problem+json ({r.content_type})")
        after = await _state(gw)
        if after != before:
            failures.append(f"{case}: store changed {before} -> {after}")
            before = after
    assert not failures, "\n".join(failures)

    # one bad part never blocks the good ones: 202 with both sequences
    async with http.post(f"{gw.dicomweb}/studies", data=_body(good_bytes[1], b"garbage", good_bytes[2]),
                         headers=h | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 202
        body = await r.json()
    assert _reasons(body) == [0xC000]
    assert len(body["00081199"]["Value"]) == 2
    # an identical re-send is accepted (warning), stored once
    async with http.post(f"{gw.dicomweb}/studies", data=_body(good_bytes[1]), headers=h | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 202
        body = await r.json()
    assert body["00081199"]["Value"][0]["00081196"]["Value"] == [0xB000]
    assert await _state(gw) == (3, 3, 0)
    # analysts may not store
    async with http.post(f"{gw.dicomweb}/studies", data=_body(good_bytes[0]),
                         headers=gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}) | {"Content-Type": DICOM_MP}) as r:
        assert r.status == 403
    # WADO with an Accept the server cannot satisfy
    st, se, sop = good[1].StudyInstanceUID, good[1].SeriesInstanceUID, good[1].SOPInstanceUID
    async with http.get(f"{gw.dicomweb}/studies/{st}/series/{se}/instances/{sop}",
                        headers=h | {"Accept": "application/zip"}) as r:
        assert r.status == 406
    async with http.get(f"{gw.dicomweb}/studies/{st}/series/{se}/instances/{sop}",
                        headers=h | {"Accept": 'multipart/related; type="application/dicom"; '
                                               'transfer-syntax=1.2.840.10008.1.2.4.50'}) as r:
        assert r.status == 406  # no JPEG encoder: say so rather than send something else


async def test_storage_errors_fail_only_their_instances(small, http, monkeypatch):
    """The disk failing while instances are put in place (ENOSPC creating a directory or renaming, EIO on
    a directory fsync) fails those instances with 0xA700 (Out of Resources) and the reason — a 202 or
    409, never a 500 — and leaves nothing of them behind; the request's other instances are stored. The
    faults are the operating system's answers (``os.replace`` / ``os.fsync`` raising), injected."""
    gw = small
    h = gw.headers("pacs") | {"Content-Type": DICOM_MP}
    ds = ct_series(patient_id="D1", patient_name="Disk^Full", n=3, size=32)
    victim = str(ds[1].SOPInstanceUID)
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)).startswith(victim + "."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    rows, files, _ = await _state(gw)
    async with http.post(f"{gw.dicomweb}/studies", data=_body(*[to_bytes(d) for d in ds]), headers=h) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    [failed] = body["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700] and failed["00081155"]["Value"] == [victim]
    reason = failed["00091010"]["Value"][0]
    assert os.strerror(errno.ENOSPC) in reason and victim not in reason
    assert sorted(i["00081155"]["Value"][0] for i in body["00081199"]["Value"]) == sorted(
        str(d.SOPInstanceUID) for d in ds if str(d.SOPInstanceUID) != victim)
    stored = (rows + 2, files + 2, 0)
    assert await _no_temp_files(gw, stored) == stored
    monkeypatch.setattr(os, "replace", real_replace)

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    more = ct_series(patient_id="D2", patient_name="Disk^Error", n=2, size=32)
    async with http.post(f"{gw.dicomweb}/studies", data=_body(*[to_bytes(d) for d in more]), headers=h) as r:
        assert r.status == 409, await r.text()
        body = await r.json()
    assert _reasons(body) == [0xA700, 0xA700]
    assert await _no_temp_files(gw, stored) == stored

    def fsync_files(fd):  # a part file's data not reaching the disk
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_files)
    async with http.post(f"{gw.dicomweb}/studies", data=_body(*[to_bytes(d) for d in more]), headers=h) as r:
        assert r.status == 409, await r.text()
        body = await r.json()
    assert _reasons(body) == [0xA700, 0xA700]
    assert await _no_temp_files(gw, stored) == stored
    monkeypatch.setattr(os, "fsync", real_fsync)
    # the disk is back: the failed instances can be sent again
    async with http.post(f"{gw.dicomweb}/studies", data=_body(to_bytes(ds[1]), *[to_bytes(d) for d in more]),
                         headers=h) as r:
        assert r.status == 200, await r.text()
    assert await _state(gw) == (rows + 5, files + 5, 0)


def _serve(data_dir: Path, port: int, db_url: str) -> subprocess.Popen:
    fedgate = str(Path(sys.executable).with_name("fedgate"))
    return subprocess.Popen([fedgate, "serve", "--data-dir", str(data_dir), "--port", str(port),
                             "--database-url", db_url, "--log-level", "WARNING"])


async def test_killed_mid_stow_leaves_no_orphans(tmp_path, db_url):
    data = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(data, port, db_url)
    try:
        await wait_ready(url, proc)
        token = subprocess.check_output([str(Path(sys.executable).with_name("fedgate")), "token", "--data-dir",
                                         str(data), "--role", "pacs"], text=True).strip()
        h = {"Authorization": f"Bearer {token}"}
        first = ct_series(patient_id="K1", patient_name="Kill^One", n=2, size=64)
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/dicomweb/studies", data=_body(*[to_bytes(d) for d in first]),
                              headers=h | {"Content-Type": DICOM_MP}) as r:
                assert r.status == 200
            victim = ct_series(patient_id="K2", patient_name="Kill^Two", n=3, size=256)
            payload = [to_bytes(d) for d in victim]

            async def slow_body():
                yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + payload[0] + b"\r\n"
                yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + payload[1][:70_000]
                await asyncio.sleep(30)  # the server dies while this part is half received

            async def kill_soon():
                blobs_tmp = data / "blobs" / "tmp"
                for _ in range(100):
                    if any(blobs_tmp.glob("*.part")):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                os.kill(proc.pid, signal.SIGKILL)

            killer = asyncio.create_task(kill_soon())
            with pytest.raises(aiohttp.ClientError):
                async with s.post(url + "/dicomweb/studies", data=slow_body(),
                                  headers=h | {"Content-Type": DICOM_MP}) as r:
                    await r.read()
            await killer
        proc.wait(timeout=10)
        assert any((data / "blobs" / "tmp").glob("*.part")), "the kill came before any part was received"
        # a crash between 'file renamed into place' and 'index committed' leaves a file without a row
        orphan = data / "blobs" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(payload[2])
        proc = _serve(data, port, db_url)
        await wait_ready(url, proc)
        assert not any((data / "blobs" / "tmp").glob("*")), "temp files survived the restart"
        assert not orphan.exists(), "a file without an index row survived the restart"
        files = {p.relative_to(data / "blobs").as_posix() for p in (data / "blobs").rglob("*.dcm")}
        rows = await _blob_rows(db_url)
        assert files == rows and len(rows) == 2
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/dicomweb/instances", headers=h) as r:
                assert len(await r.json()) == 2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _blob_rows(db_url: str) -> set[str]:
    if db_url.startswith("sqlite"):
        con = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        try:
            return {r[0] for r in con.execute("SELECT blob_path FROM dcm_instance")}
        finally:
            con.close()
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        return {r[0] for r in await conn.fetch("SELECT blob_path FROM dcm_instance")}
    finally:
        await conn.close()
