"""Inference dispatch overhead: the gateway's Triton backend (inference.backends.TritonBackend: chunking,
per-call timeout, retry wrapper) vs calling the same MLServer directly with tritonclient, same inputs and batch
sizes, gRPC; rounds interleaved, medians reported.  Optionally (--e2e) the end-to-end series → SR latency of a
100-slice CT series through a running gateway (STOW-RS, POST job, wait for succeeded; embedded backend).

    .venv/bin/python bench/inference_bench.py [--iters 200] [--e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.backends import RetryPolicy, TritonBackend
from inference.repository import DEFAULT_REPOSITORY
from tests.mlserver import MLServer

MODEL = "ct_lesion_classifier"


async def dispatch(url: str, iters: int) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aio

    direct = aio.InferenceServerClient(url=url)
    gw = TritonBackend(url, "grpc", RetryPolicy(attempts=3, timeout_s=30))
    out = {}
    try:
        for batch in (1, 16):
            x = np.random.default_rng(batch).random((batch, 1, 64, 64), dtype=np.float32)

            async def call_direct():
                inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                r = await direct.infer(MODEL, [inp], model_version="1",
                                       outputs=[grpcclient.InferRequestedOutput("OUTPUT__0")])
                return r.as_numpy("OUTPUT__0")

            async def call_gateway():
                return (await gw.infer(MODEL, "1", "INPUT__0", x, ["OUTPUT__0"]))["OUTPUT__0"]

            assert np.allclose(await call_direct(), await call_gateway())
            for _ in range(10):  # warm-up
                await call_direct()
                await call_gateway()
            td, tg = [], []
            for i in range(iters):  # interleaved, alternating which goes first
                for fn, acc in ((call_direct, td), (call_gateway, tg)) if i % 2 == 0 else \
                        ((call_gateway, tg), (call_direct, td)):
                    t = time.perf_counter()
                    await fn()
                    acc.append(time.perf_counter() - t)
            md, mg = statistics.median(td), statistics.median(tg)
            out[batch] = (md * 1e3, mg * 1e3, (mg - md) / md * 100)
    finally:
        await direct.close()
        await gw.close()
    return out


async def e2e(n_slices: int = 100) -> float:
    import aiohttp
    from dicomweb_client.api import DICOMwebClient

    from tests.conftest import make_settings, start_gateway
    from tests.integration.test_inference_api import lesion_series

    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp) / "data", f"sqlite:///{tmp}/fedgate.db",
                                 extra={"inference": {"poll_s": 0.05}})
        gw = await start_gateway(settings)
        try:
            dss, _ = lesion_series(n=n_slices)
            async with aiohttp.ClientSession() as http:
                t0 = time.perf_counter()
                client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs"))
                await asyncio.to_thread(client.store_instances, dss)
                body = {"model": "ct-lesion-segmenter", "study": dss[0].StudyInstanceUID}
                async with http.post(f"{gw.url}/inference/jobs", json=body, headers=gw.headers("clinician")) as r:
                    job = (await r.json())["jobs"][0]
                while True:
                    async with http.get(f"{gw.url}/inference/jobs/{job['id']}", headers=gw.headers("admin")) as r:
                        job = await r.json()
                    if job["state"] in ("succeeded", "failed"):
                        break
                    await asyncio.sleep(0.05)
                assert job["state"] == "succeeded", job
                return time.perf_counter() - t0
        finally:
            await gw.server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--e2e", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        srv = MLServer(Path(tmp) / "mls", DEFAULT_REPOSITORY, [MODEL]).start()
        try:
            res = asyncio.run(dispatch(srv.grpc_url, a.iters))
        finally:
            srv.stop()
    print(f"| batch | direct tritonclient median (ms) | gateway dispatch median (ms) | overhead |")
    print("|---|---|---|---|")
    for b, (d, g, o) in res.items():
        print(f"| {b} | {d:.2f} | {g:.2f} | {o:+.1f}% |")
    if a.e2e:
        print(f"end-to-end 100-slice series → SEG+SR+FHIR (STOW + job, embedded backend): {asyncio.run(e2e()):.2f} s")


if __name__ == "__main__":
    main()
