"""The STOW-RS multipart/related splitter (gateway/handlers/stow_body.py:_MultipartStream): parts come out byte
for byte whatever the block sizes the network delivers, with preamble, epilogue, transport padding, parts
without headers and data that looks like the start of a delimiter; malformed bodies → BadRequest."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gateway.errors import BadRequest
from gateway.handlers import stow_body as handlers
from gateway.handlers.stow_body import _MultipartStream, _PartWriter, _part_type

B = b"fedgate-boundary-0123"


class Blocks:
    """An aiohttp-StreamReader-like source delivering ``data`` in blocks of ``size`` bytes."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.pos = data, size, 0

    async def readany(self) -> bytes:
        out = self.data[self.pos:self.pos + self.size]
        self.pos += len(out)
        return out


async def _split(body: bytes, size: int) -> list[tuple[bytes, bytes]]:
    stream = _MultipartStream(Blocks(body, size), B)
    out = []
    while (headers := await stream.next_part()) is not None:
        chunks: list[bytes] = []
        await stream.body(lambda data: chunks.append(bytes(data)))  # data is only valid during the call
        out.append((headers, b"".join(chunks)))
    return out


def _body(parts: list[tuple[bytes, bytes]], *, preamble: bytes = b"", epilogue: bytes = b"",
          padding: bytes = b"") -> bytes:
    out = preamble + (b"\r\n" if preamble else b"")
    for headers, data in parts:
        out += b"--" + B + padding + b"\r\n" + headers + b"\r\n" + data + b"\r\n"
    return out + b"--" + B + b"--" + padding + b"\r\n" + epilogue


TRICKY = b"\r\n--" + B[:-1] + b"X" + b"\r\n-" + b"--" + B[:5] + b"\r"  # delimiter prefixes inside the data


@pytest.mark.parametrize("size", [1, 2, 7, 31, 1024, 65536, 10**7])
async def test_parts_come_out_byte_for_byte(size):
    parts = [
        (b"Content-Type: application/dicom\r\n", os.urandom(5000) + TRICKY + os.urandom(300)),
        (b"", b"no headers at all"),
        (b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\nX-Other: y\r\n", b""),
        (b"Content-Type: text/plain\r\n", TRICKY),
    ]
    body = _body(parts, preamble=b"this is the preamble", epilogue=b"and an epilogue", padding=b" \t ")
    got = await _split(body, size)
    assert [d for _, d in got] == [d for _, d in parts]
    assert [h for h, _ in got] == [h.removesuffix(b"\r\n") for h, _ in parts]
    assert [_part_type(h) for h, _ in got] == ["application/dicom", "application/dicom", "application/dicom",
                                                 "text/plain"]


@pytest.mark.parametrize("body", [
    b"no boundary lines at all",
    b"--" + B + b"\r\nContent-Type: application/dicom\r\n\r\ndata without a closing delimiter",
    b"--" + B + b"\r\nContent-Type: application/dicom\r\nheaders that never end",
    b"--" + B + b"junk after the delimiter\r\n\r\ndata\r\n--" + B + b"--\r\n",
    b"--" + B,
])
@pytest.mark.parametrize("size", [3, 65536])
async def test_malformed_bodies_are_bad_requests(body, size):
    with pytest.raises(BadRequest, match="malformed multipart body"):
        await _split(body, size)


async def test_empty_multipart_has_no_parts():
    assert await _split(b"--" + B + b"--\r\n", 5) == []


def _open_anywhere(path) -> bool:
    """Whether any fd of this process is open on ``path``."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def _direct_io_dir(tmp_path) -> bool:
    """Whether files under ``tmp_path`` accept O_DIRECT (ext4/xfs: yes; tmpfs: no)."""
    fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(tmp_path / "probe")


class SlowBlocks(Blocks):
    """Like Blocks, but each block is a fresh ``bytes`` object and arrives after a yield to the event loop, so
    the part writer's thread batches overlap the splitting."""

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        return bytes(await super().readany())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size,batch", [(1, 64), (7, 1000), (1024, 4096), (65536, 100_000), (10**7, 1 << 20)])
async def test_part_files_are_written_byte_for_byte(size, batch, direct, tmp_path, monkeypatch):
    """The STOW receive path's writer (_PartWriter: blocks kept without a copy where immutable, written by a
    thread per batch, the last batch + fsync + close in one job) leaves exactly each part's bytes on disk,
    with O_DIRECT (whole blocks from the staging buffer, a tail kept for the next batch) or without."""
    monkeypatch.setattr(handlers, "WRITE_BATCH", batch)
    parts = [(b"Content-Type: application/dicom\r\n", os.urandom(300_000) + TRICKY + os.urandom(5000)),
             (b"", b""), (b"", TRICKY * 50), (b"", os.urandom(70_001))]
    stream = _MultipartStream(SlowBlocks(_body(parts), size), B)
    paths = []
    while (await stream.next_part()) is not None:
        path = tmp_path / f"{len(paths)}.part"
        writer = _PartWriter(path, direct)
        await stream.body(writer.feed, writer.drain)
        written, synced = await writer.finish()
        await written
        assert path.read_bytes() == parts[len(paths)][1]  # complete once `written` is done
        assert await synced is None
        assert writer.file.fd is None and not _open_anywhere(path)  # the job closed it
        paths.append(path)
    assert len(paths) == len(parts)


async def test_part_writer_uses_o_direct_where_the_file_system_has_it(tmp_path, monkeypatch):
    """On a file system with O_DIRECT (the test's tmp dir on ext4/xfs) whole blocks are written directly
    (the file is open with O_DIRECT while the batches are written); on one without it (tmpfs: /dev/shm)
    the same bytes go through the page cache."""
    monkeypatch.setattr(handlers, "WRITE_BATCH", 100_000)
    data = os.urandom(3 * handlers._STAGE_BYTES + 12345)
    dirs = [(tmp_path, _direct_io_dir(tmp_path))]
    if os.path.isdir("/dev/shm"):
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
        dirs.append((shm, _direct_io_dir(shm)))
    assert any(ok for _d, ok in dirs), "no O_DIRECT-capable directory to test with"
    try:
        for d, capable in dirs:
            path = d / "x.part"
            writer = _PartWriter(path, True)
            flags = []
            for i in range(0, len(data), 50_000):
                writer.feed(data[i:i + 50_000])
                await writer.drain()
                if writer.file.fd is not None:
                    flags.append(bool(fcntl.fcntl(writer.file.fd, fcntl.F_GETFL) & os.O_DIRECT))
            assert flags and all(f == capable for f in flags)
            written, synced = await writer.finish()
            await written
            assert await synced is None
            assert path.read_bytes() == data
    finally:
        if len(dirs) > 1:
            shutil.rmtree(dirs[1][0])


async def test_part_writer_abort_closes_and_removes_after_the_batch_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(handlers, "WRITE_BATCH", 10)
    writer = _PartWriter(tmp_path / "x.part")
    writer.feed(b"a" * 100)
    await writer.drain()  # a batch goes to a thread (which creates the file)
    job = writer.job
    writer.feed(memoryview(bytearray(b"b" * 5)))  # a view of a mutable buffer is copied
    writer.abort()
    writer.abort()  # idempotent
    await job
    await asyncio.sleep(0.01)
    assert writer.file.fd is None and not _open_anywhere(tmp_path / "x.part")
    assert not (tmp_path / "x.part").exists()  # removed after the thread created and wrote it
