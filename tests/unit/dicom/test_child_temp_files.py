"""Issue 20: the temp files of a server process that exited are removed by the supervising parent at
once (gateway.serve), those of live processes are kept."""

from __future__ import annotations

import os

from gateway.store.blobs import BlobStore


def test_remove_temp_files_of_an_exited_process(tmp_path):
    mine = BlobStore(tmp_path)  # this process's temp names carry os.getpid()
    live = [mine.temp_path() for _ in range(2)]
    for p in live:
        p.write_bytes(b"x")
    dead_pid = 4194303  # above Linux's pid_max default range for this test's other names
    dead = [tmp_path / "tmp" / f"0123456789abcdef-{dead_pid}-{i}.part" for i in range(3)]
    for p in dead:
        p.write_bytes(b"y")
    assert BlobStore.remove_temp_files_of(tmp_path, dead_pid) == 3
    assert not any(p.exists() for p in dead) and all(p.exists() for p in live)
    assert BlobStore.remove_temp_files_of(tmp_path, os.getpid()) == 2
