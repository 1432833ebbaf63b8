"""The Triton path with the real tritonclient (gRPC and HTTP) against MLServer serving the same TorchScript
models as the embedded backend; the embedded backend gives the same outputs on the same inputs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inference.backends import BackendUnavailable, EmbeddedBackend, RetryPolicy, TritonBackend
from inference.repository import DEFAULT_REPOSITORY
from inference.train_synthetic import WC, WW, synth_slice
from inference.preprocess import window
from tests.mlserver import MLServer

MODELS = ["ct_lesion_classifier", "ct_lesion_segmenter"]


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    srv = MLServer(tmp_path_factory.mktemp("mlserver"), DEFAULT_REPOSITORY, MODELS).start()
    yield srv
    srv.stop()


def _inputs(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        img, _ = synth_slice(rng, bool(i % 2))
        xs.append(window(img, WC, WW)[None])
        ys.append(i % 2)
    return np.stack(xs).astype(np.float32), np.array(ys)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("n", [1, 5, 37])
async def test_triton_matches_embedded(mlserver, protocol, n):
    x, labels = _inputs(n)
    url = mlserver.grpc_url if protocol == "grpc" else mlserver.http_url
    remote = TritonBackend(url, protocol, RetryPolicy(attempts=2, timeout_s=60))
    local = EmbeddedBackend(DEFAULT_REPOSITORY)
    try:
        assert await remote.ready()
        assert await remote.ready("ct_lesion_classifier", "1")
        for model in MODELS:
            got = (await remote.infer(model, "1", "INPUT__0", x, ["OUTPUT__0"]))["OUTPUT__0"]
            want = (await local.infer(model, "1", "INPUT__0", x, ["OUTPUT__0"]))["OUTPUT__0"]
            assert got.shape == want.shape and got.shape[0] == n
            assert np.allclose(got, want, atol=1e-5)
        # the shipped classifier actually separates the synthetic classes
        probs = (await remote.infer("ct_lesion_classifier", "1", "INPUT__0", x, ["OUTPUT__0"]))["OUTPUT__0"]
        assert (probs.argmax(1) == labels).mean() >= 0.9
        # batching: chunks of max_batch_size (16) → ceil(n/16) requests
        calls = remote.calls
        await remote.infer("ct_lesion_classifier", "1", "INPUT__0", x, ["OUTPUT__0"])
        assert remote.calls - calls == -(-n // 16)
    finally:
        await remote.close()
        await local.close()


async def test_unknown_model_is_not_retried(mlserver):
    remote = TritonBackend(mlserver.grpc_url, "grpc", RetryPolicy(attempts=4, base_delay_s=0.05))
    try:
        assert not await remote.ready("no_such_model", "1")
        with pytest.raises(Exception) as ei:
            await remote.infer("no_such_model", "1", "INPUT__0", _inputs(1)[0], ["OUTPUT__0"])
        assert type(ei.value).__name__ == "BackendError"
        assert remote.calls == 1
    finally:
        await remote.close()


async def test_repository_unload_load(mlserver):
    remote = TritonBackend(mlserver.grpc_url, "grpc", RetryPolicy(attempts=2, timeout_s=60))
    try:
        await remote.unload("ct_lesion_segmenter")
        assert not await remote.ready("ct_lesion_segmenter", "1")
        await remote.load("ct_lesion_segmenter")
        assert await remote.ready("ct_lesion_segmenter", "1")
    finally:
        await remote.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_server_down_then_back(tmp_path, protocol):
    srv = MLServer(tmp_path / "mls", DEFAULT_REPOSITORY, ["ct_lesion_classifier"]).start()
    x, _ = _inputs(3)
    url = srv.grpc_url if protocol == "grpc" else srv.http_url
    want = (await EmbeddedBackend(DEFAULT_REPOSITORY).infer("ct_lesion_classifier", "1", "INPUT__0", x,
                                                             ["OUTPUT__0"]))["OUTPUT__0"]
    remote = TritonBackend(url, protocol, RetryPolicy(attempts=40, base_delay_s=0.2, max_delay_s=1.0, timeout_s=30))
    try:
        assert np.allclose((await remote.infer("ct_lesion_classifier", "1", "INPUT__0", x, ["OUTPUT__0"]))
                           ["OUTPUT__0"], want, atol=1e-5)
        srv.stop()
        # a short policy gives up: BackendUnavailable (the job layer re-queues it)
        short = TritonBackend(url, protocol, RetryPolicy(attempts=2, base_delay_s=0.05, timeout_s=5))
        with pytest.raises(BackendUnavailable):
            await short.infer("ct_lesion_classifier", "1", "INPUT__0", x, ["OUTPUT__0"])
        await short.close()
        # the dispatcher keeps retrying with back-off while the server comes back
        before = remote.calls
        task = asyncio.create_task(remote.infer("ct_lesion_classifier", "1", "INPUT__0", x, ["OUTPUT__0"]))
        await asyncio.sleep(1.0)
        assert not task.done()
        await asyncio.to_thread(srv.start)
        got = (await asyncio.wait_for(task, 120))["OUTPUT__0"]
        assert np.allclose(got, want, atol=1e-5)
        assert remote.calls - before >= 2  # it failed at least once before succeeding
    finally:
        await remote.close()
        srv.stop()
