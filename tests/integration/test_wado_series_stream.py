"""Issue 27: whole-series and whole-study WADO-RS streamed from disk (``Retrieval.stream``: the part heads
built up front, each file sent with sendfile straight to the socket, the socket waited for only when full).

Expected bytes are the PS3.10 files as sent with STOW-RS (pydicom's writing, never fedgate's); the answers
are split with the standard library's MIME parser. A slow reader with a small receive buffer makes the
server wait for the socket mid-file; a reader that hangs up, and a stored file that changes mid-answer, cut
the answer (never a 500 inside a 200) and leave the server serving. Both engines (the ``gateway`` fixture)."""

from __future__ import annotations

import asyncio
import email
import os
import socket
from urllib.parse import urlsplit

import pytest

from tests.dicom_synth import ct_series, stow_body, to_bytes

BOUNDARY = "fedgateSTREAMboundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
ACCEPT = 'multipart/related; type="application/dicom"'
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert msg.is_multipart() and not msg.defects, msg.defects
    return [(p["Content-Type"], p.get_payload(decode=True)) for p in msg.get_payload()]


@pytest.fixture
async def study(gateway, http):
    """One study of two series (12 and 3 slices of 256², ~130 KB each), stored in two STOW requests out of
    order; returns (study UID, {series UID: [file bytes in instance order]}, the last SOP Instance UID of
    the 12-slice series)."""
    a = ct_series(patient_id="STR1", patient_name="Stream^Anna", n=12, size=256)
    b = ct_series(patient_id="STR1", patient_name="Stream^Anna", n=3, size=256, study_uid=a[0].StudyInstanceUID)
    for batch in (a[6:] + b, a[:6]):
        async with http.post(f"{gateway.dicomweb}/studies", data=stow_body(batch, BOUNDARY),
                             headers=gateway.headers("pacs") | {"Content-Type": DICOM_MP}) as r:
            assert r.status == 200, await r.text()
    series = {}
    for ds in a + b:
        series.setdefault(ds.SeriesInstanceUID, []).append((int(ds.InstanceNumber), to_bytes(ds)))
    return a[0].StudyInstanceUID, {uid: [f for _, f in sorted(v)] for uid, v in series.items()}, a[-1].SOPInstanceUID


async def _retrieve(http, url: str, headers: dict) -> tuple[int, dict, bytes]:
    async with http.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_series_and_study_parts_are_the_stored_files(gateway, http, study):
    st, series, _ = study
    h = gateway.headers("clinician")
    for accept in (ACCEPT, ACCEPT + "; transfer-syntax=*", ACCEPT + f"; transfer-syntax={EXPLICIT_LE}"):
        for se, files in series.items():
            status, headers, body = await _retrieve(http, f"{gateway.dicomweb}/studies/{st}/series/{se}",
                                                    h | {"Accept": accept})
            assert status == 200 and int(headers["Content-Length"]) == len(body)
            parts = _parts(headers["Content-Type"], body)
            assert [p for _, p in parts] == files  # byte-identical, instance order
            assert {t for t, _ in parts} == {f"application/dicom; transfer-syntax={EXPLICIT_LE}"}
        status, headers, body = await _retrieve(http, f"{gateway.dicomweb}/studies/{st}", h | {"Accept": accept})
        assert status == 200 and int(headers["Content-Length"]) == len(body)
        assert [p for _, p in _parts(headers["Content-Type"], body)] == [f for se in sorted(series) for f in series[se]]
    # negotiation unchanged: a transfer syntax the stored files cannot be sent in is a 406 before any byte
    se = next(iter(series))
    status, _, _ = await _retrieve(http, f"{gateway.dicomweb}/studies/{st}/series/{se}",
                                   h | {"Accept": ACCEPT + "; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert status in (200, 406)
    status, _, _ = await _retrieve(http, f"{gateway.dicomweb}/studies/{st}/series/{se}", h | {"Accept": "text/html"})
    assert status == 406


async def _raw_get(gateway, path: str, headers: dict, rcvbuf: int = 4096) -> socket.socket:
    """A GET sent on a socket of our own, with a small receive buffer (the server's sends fill it)."""
    u = urlsplit(gateway.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (u.hostname, u.port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    await loop.sock_sendall(sock, f"GET {u.path}{path} HTTP/1.1\r\nHost: {u.netloc}\r\n{head}\r\n".encode())
    return sock


async def _read(sock: socket.socket, *, until: int | None = None, pause: float = 0.0) -> bytes:
    loop, got = asyncio.get_running_loop(), bytearray()
    while until is None or len(got) < until:
        chunk = await loop.sock_recv(sock, 2048 if pause else 1 << 16)
        if not chunk:
            break
        got += chunk
        if pause:
            await asyncio.sleep(pause)
    return bytes(got)


def _split(raw: bytes) -> tuple[dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}, body


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_slow_reader_gets_every_byte(gateway, study):
    """The reader takes 2 KB at a time: the server's socket fills mid-file again and again."""
    st, series, _ = study
    se = next(se for se, files in series.items() if len(files) == 12)
    sock = await _raw_get(gateway, f"/dicomweb/studies/{st}/series/{se}",
                          gateway.headers("clinician") | {"Accept": ACCEPT, "Connection": "close"})
    try:
        raw = await _read(sock, pause=0.0005)
    finally:
        sock.close()
    headers, body = _split(raw)
    assert int(headers["content-length"]) == len(body)
    assert [p for _, p in _parts(headers["content-type"], body)] == series[se]


async def test_a_reader_that_hangs_up_or_a_changed_file_cut_the_answer(gateway, http, study):
    st, series, last_sop = study
    se = next(se for se, files in series.items() if len(files) == 12)
    url = f"/dicomweb/studies/{st}/series/{se}"
    h = gateway.headers("clinician") | {"Accept": ACCEPT}
    await _retrieve(http, gateway.url + url, h)  # warm: the fds a first request opens for good (database)
    before = _open_fds()
    for _ in range(3):  # the reader goes away after the first 100 KB
        sock = await _raw_get(gateway, url, h)
        await _read(sock, until=100_000)
        sock.close()
    # the series' last file changes once the answer has started: the connection is closed short
    sock = await _raw_get(gateway, url, h | {"Connection": "close"})
    try:
        first = await _read(sock, until=50_000)
        headers, _ = _split(first)
        [last] = (gateway.settings.data_dir / "blobs").rglob(f"{last_sop}.*.dcm")
        with open(last, "r+b") as f:
            f.truncate(1000)
        raw = first + await _read(sock)
    finally:
        sock.close()
    _, body = _split(raw)
    assert len(body) < int(headers["content-length"])
    # the server goes on: the series of the other request answers in full, and no descriptor is left open
    other = next(s for s in series if s != se)
    status, headers, body = await _retrieve(http, f"{gateway.dicomweb}/studies/{st}/series/{other}", h)
    assert status == 200 and [p for _, p in _parts(headers["Content-Type"], body)] == series[other]
    for _ in range(50):
        if _open_fds() <= before:
            break
        await asyncio.sleep(0.05)
    assert _open_fds() <= before
