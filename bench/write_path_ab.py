"""Write-path A/B of one source tree: bulk ``fhir_repo.apply_writes`` (the consent bench's load) and HTTP PUT
of one resource per request (ehr-system, treatment), as wall-clock and CPU-time rates.

Usage (run once per tree, alternating, e.g. a ``git archive`` copy of main and this checkout)::

    PYTHONPATH=TREE .venv/bin/python bench/write_path_ab.py TREE DATABASE_URL|"" PATIENTS PUTS
"""
import asyncio, sys, tempfile, time, json
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

tree, engine_url, patients, n_put = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree)
from gateway.app import create_app  # noqa
from gateway import keys  # noqa
from gateway.settings import load_settings  # noqa
from gateway.auth import issue_dev_token  # noqa
sys.path.insert(0, tree + "/bench")
import consent_gate_bench as cb  # noqa


async def main():
    tmp = Path(tempfile.mkdtemp(prefix="i19ab-"))
    settings = load_settings(env={}, overrides={"data_dir": tmp, "database_url": engine_url,
                                                 "jwt_secret": "bench-" + "x" * 32, "log_level": "WARNING"})
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        n = await cb.load(app, patients, 48)
        bulk = n / (time.perf_counter() - t0)
        bulk_cpu = n / (time.process_time() - c0)
        tok = {"Authorization": "Bearer " + issue_dev_token(settings, subject="ehr", roles=["ehr-system"], ttl_s=3600),
               "Content-Type": "application/fhir+json"}
        base = str(server.make_url("/fhir"))
        async with aiohttp.ClientSession() as http:
            t0, c0 = time.perf_counter(), time.process_time()
            for k in range(n_put):
                pid = f"bp{k % patients}"
                res = {"resourceType": "Observation", "id": f"put{k}", "status": "final",
                       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                       "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": k, "unit": "/min"}}
                async with http.put(f"{base}/Observation/put{k}", json=res, headers=tok) as r:
                    assert r.status in (200, 201), await r.text()
            put = n_put / (time.perf_counter() - t0)
            put_cpu = n_put / (time.process_time() - c0)
    finally:
        await server.close()
    print(json.dumps({"tree": tree, "engine": "postgresql" if engine_url else "sqlite", "bulk_res_s": round(bulk),
                      "put_res_s": round(put, 1),
                      "bulk_res_cpu_s": round(bulk_cpu), "put_res_cpu_s": round(put_cpu, 1)}))

asyncio.run(main())
