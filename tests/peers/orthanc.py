"""Orthanc (Debian package) as a real PACS peer: started per test on free loopback ports with its own
storage and configuration, stopped afterwards. Installed by scripts/setup.d/20-orthanc.sh; a missing
Orthanc is an error, never a skip."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from tests.procs import free_port

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextmanager
def orthanc(workdir: Path, dicomweb_servers: dict | None = None, *, dicom_port: int | None = None,
            modalities: dict | None = None) -> Iterator[str]:
    """Run Orthanc; yields its base URL (REST at /, DICOMweb at /dicom-web). ``dicom_port``: its DIMSE
    listener there (AE title ORTHANC, accepts any calling AE), ``modalities``: its DicomModalities."""
    binary = shutil.which("Orthanc")
    if binary is None or not Path(PLUGIN).exists():
        raise RuntimeError("Orthanc is not installed: run scripts/setup.d/20-orthanc.sh")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "fedgate-test-peer",
        "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
        "StorageCompression": False, "OverwriteInstances": False, "SaveJobs": False,
        "Plugins": [PLUGIN],
        "HttpServerEnabled": True, "HttpPort": port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "HttpDescribeErrors": True,
        "DicomServerEnabled": dicom_port is not None, "DicomPort": dicom_port or 4242, "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomModalities": modalities or {},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "w")
    proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(url + "/system", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError("Orthanc did not start")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
