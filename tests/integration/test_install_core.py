"""``pip install .`` with no extras gives a working gateway without torch or tritonclient: a fresh venv,
the package installed as a user installs it (not editable), ``fedgate serve`` answering FHIR and DICOMweb,
and a clear answer from the inference routes that need the ``ml`` extra — never an import error at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from tests.conftest import REPO
from tests.dicom_synth import ct_series, stow_body
from tests.procs import free_port, wait_ready

BOUNDARY = "fedgateCOREboundary"


async def test_core_install_serves_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", str(REPO)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    py = str(venv / "bin" / "python")
    for mod in ("torch", "tritonclient"):
        probe = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{mod} was installed by `pip install .`: it belongs in the ml extra"
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    proc = subprocess.Popen([str(venv / "bin" / "fedgate"), "serve", "--data-dir", str(data), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc, timeout=90)
        token = subprocess.run([str(venv / "bin" / "fedgate"), "token", "--data-dir", str(data), "--role", "admin"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/fhir/metadata") as r:
                assert r.status == 200
            patient = {"resourceType": "Patient", "name": [{"family": "Core"}]}
            async with http.post(url + "/fhir/Patient", json=patient,
                                 headers={**auth, "Content-Type": "application/fhir+json"}) as r:
                assert r.status == 201
            body = stow_body(ct_series(patient_id="CORE1", patient_name="Core^Install", n=2, size=16), BOUNDARY)
            async with http.post(url + "/dicomweb/studies", data=body, headers={
                    **auth, "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}) as r:
                assert r.status == 200
            async with http.get(url + "/dicomweb/studies", headers=auth) as r:
                assert r.status == 200 and len(await r.json()) == 1
            async with http.get(url + "/inference/models", headers=auth) as r:
                assert r.status < 500, await r.text()
            async with http.get(url + "/metrics", headers=auth) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "Traceback" not in err, err[-3000:]
