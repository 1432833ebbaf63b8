"""The DICOMweb benchmark's streaming multipart reader (bench/dicomweb_bench.py ``MultipartScan``): what it
reports for a body fed in arbitrary pieces — part headers, payload sizes, the first 132 payload bytes — is
what the body was built from (random payloads holding CR, LF, dashes and near-delimiters, chunks from 1
byte to whole bodies)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "dicomweb_bench", Path(__file__).resolve().parents[2] / "bench" / "dicomweb_bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _body(rng: random.Random, boundary: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    parts = []
    for _ in range(rng.randint(0, 5)):
        size = rng.choice([0, 1, 5, 131, 132, 133, 500, rng.randint(0, 5000)])
        payload = bytes(rng.choice(b"\r\n-DICMabB") for _ in range(size))
        if rng.random() < 0.3:  # a near-delimiter inside the payload
            payload += b"\r\n--" + boundary.encode()[:-1] + b"x"
        head = rng.choice([b"Content-Type: application/dicom", b"Content-Type: a\r\nX-Y: z"])
        parts.append((head, payload))
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + h + b"\r\n\r\n" + p + b"\r\n" for h, p in parts) + b"--" + b + b"--\r\n"
    return body, parts


@pytest.mark.parametrize("seed", range(4))
def test_scan_reports_each_part_whatever_the_chunks(seed):
    rng = random.Random(seed)
    for _ in range(300):
        boundary = "B" + "".join(rng.choice("abc0123-") for _ in range(rng.randint(1, 30)))
        body, parts = _body(rng, boundary)
        scan = bench.MultipartScan(f'multipart/related; type="application/dicom"; boundary="{boundary}"')
        i = 0
        while i < len(body):
            k = rng.choice([1, 2, 3, 7, 50, 1000, 1 << 20])
            scan.feed(body[i:i + k])
            i += k
        assert scan.close() == [(h, len(p), p[:132]) for h, p in parts]


def test_scan_refuses_a_body_that_ends_early():
    scan = bench.MultipartScan("multipart/related; boundary=X")
    scan.feed(b"--X\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--X")
    with pytest.raises(ValueError):
        scan.close()
    with pytest.raises(ValueError):
        bench.MultipartScan("multipart/related")
