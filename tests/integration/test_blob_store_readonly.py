"""A blob store that cannot be written (a read-only mount: a real EROFS, from a tmpfs mounted read-only):
the gateway still starts and serves what it holds, STOW answers 0xA700 for each instance with a reason, and
nothing is half stored (issue 20: it answered 500, and on SQLite the server did not start)."""

from __future__ import annotations

import subprocess

import aiohttp
import pytest

from tests.conftest import make_settings, start_gateway
from tests.dicom_synth import ct_series, stow_body

BOUNDARY = "fedgateROboundary"
STOW = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _mount(*args: str) -> None:
    out = subprocess.run(["mount", *args], capture_output=True, text=True)
    assert out.returncode == 0, f"mount {' '.join(args)}: {out.stderr} (the test needs mount: it runs as root)"


@pytest.fixture
def blobs_mount(tmp_path):
    blobs = tmp_path / "ro" / "blobs"
    blobs.mkdir(parents=True)
    _mount("-t", "tmpfs", "-o", "size=32m", "tmpfs", str(blobs))
    try:
        yield blobs
    finally:
        subprocess.run(["umount", "-l", str(blobs)], capture_output=True)


async def test_read_only_store_serves_reads_and_refuses_writes_with_a700(tmp_path, db_url, blobs_mount):
    async with aiohttp.ClientSession() as http:
        await _scenario(tmp_path, db_url, http, blobs_mount)


async def _scenario(tmp_path, db_url, http, blobs_mount) -> None:
    settings = make_settings(tmp_path / "ro", db_url)
    gw = await start_gateway(settings)
    pacs = {**gw.headers("pacs"), "Content-Type": STOW}
    try:
        first = ct_series(patient_id="RO1", patient_name="Read^Only", n=2, size=16)
        async with http.post(gw.dicomweb + "/studies", data=stow_body(first, BOUNDARY), headers=pacs) as r:
            assert r.status == 200
    finally:
        await gw.server.close()
    _mount("-o", "remount,ro", str(blobs_mount))

    gw = await start_gateway(settings)  # starts on a read-only store (was a traceback on SQLite)
    pacs = {**gw.headers("pacs"), "Content-Type": STOW}
    try:
        study = first[0].StudyInstanceUID
        async with http.get(f"{gw.dicomweb}/studies/{study}", headers={**gw.headers("clinician"),
                                                                        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as r:
            assert r.status == 200  # what it holds is still served
        more = ct_series(patient_id="RO2", patient_name="Read^Only2", n=3, size=16)
        async with http.post(gw.dicomweb + "/studies", data=stow_body(more, BOUNDARY), headers=pacs) as r:
            assert r.status == 409, await r.text()
            body = await r.json()
        failed = body["00081198"]["Value"]
        assert len(failed) == 3
        for item in failed:
            assert item["00081197"]["Value"] == [0xA700]
            assert "cannot be written" in item["00091010"]["Value"][0]
        async with http.get(gw.dicomweb + "/instances", headers=gw.headers("clinician")) as r:
            assert r.status == 200 and len(await r.json()) == 2  # nothing of the refused request was indexed
    finally:
        await gw.server.close()
