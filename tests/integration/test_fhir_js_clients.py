"""Issue 22: real FHIR JS clients — fhir-kit-client and SMART's fhirclient (npm, pinned in tests/js/) — run a
script of compartment search, system search, PATCH (If-Match) and $everything against the running gateway.

The clients are installed by scripts/setup.d/50-fhir-js-clients.sh; without them the test fails (it never
skips). The outcome is checked again here over plain HTTP. Both engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from tests.integration.test_fhir_client_surface import _smart_token

JS = Path(__file__).resolve().parents[1] / "js"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


async def test_fhir_kit_client_and_smart_fhirclient(gateway, http):
    node = shutil.which("node")
    assert node, "node is not installed (Debian: nodejs); see scripts/setup.d/50-fhir-js-clients.sh"
    assert (JS / "node_modules" / "fhir-kit-client").is_dir() and (JS / "node_modules" / "fhirclient").is_dir(), \
        "the FHIR JS clients are not installed: run scripts/setup (scripts/setup.d/50-fhir-js-clients.sh)"
    entries = [{"resource": {"resourceType": "Patient", "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}}
               for pid in ("js-a", "js-b")]
    entries += [{"resource": {"resourceType": "Observation", "id": f"js-{pid}-{n}", "status": "final",
                              "code": {"text": "hr"}, "subject": {"reference": f"Patient/js-{pid}"},
                              "valueQuantity": {"value": n}},
                 "request": {"method": "PUT", "url": f"Observation/js-{pid}-{n}"}}
                for pid, k in (("a", 3), ("b", 2)) for n in range(k)]
    async with http.post(gateway.fhir, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                         headers=gateway.headers("ehr-system") | FHIR_JSON) as r:
        assert r.status == 200, await r.text()
    env = os.environ | {"FHIR_BASE": gateway.fhir, "TOKEN": gateway.token("ehr-system"),
                        "SMART_TOKEN": _smart_token(gateway, "openid fhirUser user/*.cruds"),
                        "PATIENT_TOKEN": _smart_token(gateway, "launch/patient openid patient/*.read", patient="js-a"),
                        "PATIENT": "js-a", "OTHER": "js-b", "OBSERVATION": "js-a-1", "N_OBS": "3"}
    proc = await asyncio.create_subprocess_exec(node, str(JS / "fhir_clients.mjs"), cwd=JS, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (out.decode()[-3000:], err.decode()[-3000:])
    steps = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert steps[-1] == {"done": True} and len(steps) == 17, steps
    # what the clients did, seen over plain HTTP: two patches (versions 2 and 3), the other patient untouched
    async with http.get(f"{gateway.fhir}/Observation/js-a-1", headers=gateway.headers("clinician")) as r:
        obs = await r.json()
    assert obs["meta"]["versionId"] == "3" and obs["valueQuantity"]["value"] == 101
    assert obs["note"] == [{"text": "via SMART"}]
    async with http.get(f"{gateway.fhir}/Observation/js-b-1", headers=gateway.headers("clinician")) as r:
        assert (await r.json())["meta"]["versionId"] == "1"
