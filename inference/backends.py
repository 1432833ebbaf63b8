"""Inference backends: the same Triton-layout model repository served in-process (embedded torch) or by a
KServe-v2 server (NVIDIA Triton, MLServer) through tritonclient's asyncio clients (gRPC or HTTP).

Both implement :class:`Backend`: ``infer(model, version, input_name, array, output_names) → {name: array}``
with instance batching (chunks of the model's ``max_batch_size``); the Triton backend adds per-call
timeouts, retries with exponential back-off, readiness checks and repository load/unload.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np

from inference.repository import model_path, read_config

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The inference server could not be reached (after retries): the job waits and is retried later."""


class BackendError(RuntimeError):
    """The inference server refused the request (bad model/input): retrying will not help."""


class Backend(Protocol):
    kind: str

    async def infer(
        self, model: str, version: str, input_name: str, x: np.ndarray, outputs: list[str]
    ) -> dict[str, np.ndarray]: ...

    async def ready(self, model: str | None = None, version: str = "") -> bool: ...

    async def close(self) -> None: ...


def _chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), max(size, 1)):
        yield x[i : i + size]


class EmbeddedBackend:
    """TorchScript models from the repository run in a worker thread (the event loop never blocks)."""

    kind = "embedded"

    def __init__(self, repo: Path, device: str = "cpu") -> None:
        self.repo = Path(repo)
        #: searched in order; deployed (federated-training) models live in a site-writable repository
        self.repos: list[Path] = [self.repo]
        self.device = device
        self._models: dict[tuple[str, str], object] = {}
        self._lock = asyncio.Lock()

    def add_repository(self, repo: Path) -> None:
        """Also serve the models of ``repo`` (checked before the shipped repository)."""
        repo = Path(repo)
        if repo not in self.repos:
            self.repos.insert(0, repo)

    def _repo_of(self, model: str, version: str) -> Path:
        for r in self.repos:
            if model_path(r, model, version).is_file():
                return r
        return self.repo

    def _path(self, model: str, version: str) -> Path:
        return model_path(self._repo_of(model, version), model, version)

    def _load_sync(self, model: str, version: str) -> Any:
        try:
            import torch
        except ImportError:
            raise BackendError(
                "the embedded backend needs torch (pip install 'fedgate[ml]'), "
                "or set inference.url to a Triton/KServe v2 server"
            ) from None

        m = torch.jit.load(str(self._path(model, version)), map_location=self.device)
        m.eval()
        return m

    async def _model(self, model: str, version: str) -> Any:
        key = (model, version)
        if key not in self._models:
            async with self._lock:
                if key not in self._models:
                    if not self._path(model, version).is_file():
                        raise BackendError(f"model {model} version {version} is not in the repository")
                    self._models[key] = await asyncio.to_thread(self._load_sync, model, version)
        return self._models[key]

    def _run(self, m: Any, x: np.ndarray, max_batch: int) -> np.ndarray:
        import torch

        outs = []
        with torch.inference_mode():
            for chunk in _chunks(x, max_batch):
                outs.append(m(torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)).cpu().numpy())
        return np.concatenate(outs)

    async def infer(
        self, model: str, version: str, input_name: str, x: np.ndarray, outputs: list[str]
    ) -> dict[str, np.ndarray]:
        m = await self._model(model, version)
        cfg = read_config(self._repo_of(model, version), model)
        y = await asyncio.to_thread(self._run, m, x.astype(np.float32), cfg.max_batch_size or len(x))
        return {outputs[0]: y}

    async def ready(self, model: str | None = None, version: str = "") -> bool:
        return model is None or self._path(model, version or "1").is_file()

    async def load(self, model: str, version: str = "1") -> None:
        await self._model(model, version)

    async def unload(self, model: str) -> None:
        for k in [k for k in self._models if k[0] == model]:
            del self._models[k]

    async def close(self) -> None:
        self._models.clear()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    timeout_s: float = 30.0

    def delay(self, attempt: int) -> float:
        d = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return d * (0.5 + random.random() / 2)  # type: ignore[no-any-return]  # jitter


class TritonBackend:
    """tritonclient.grpc.aio or tritonclient.http.aio (``protocol``); one client per app, shared."""

    def __init__(
        self, url: str, protocol: str = "grpc", retry: RetryPolicy | None = None, max_batch_size: int = 16
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"inference protocol must be 'grpc' or 'http', not {protocol!r}")
        self.url = url.removeprefix("grpc://").removeprefix("http://")
        self.protocol = protocol
        self.kind = f"triton-{protocol}"
        self.retry = retry or RetryPolicy()
        self.max_batch_size = max_batch_size
        if protocol == "grpc":
            import tritonclient.grpc as mod
            import tritonclient.grpc.aio as aio
        else:
            import tritonclient.http as mod
            import tritonclient.http.aio as aio
        self._mod = mod
        self._client = aio.InferenceServerClient(url=self.url)
        self.calls = 0  # requests sent (incl. retries), for tests/metrics

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, (asyncio.TimeoutError, OSError, aiohttp.ClientError)):
            return True
        if isinstance(exc, InferenceServerException):
            status = (exc.status() or "").upper()
            msg = (exc.message() or "").lower()
            return (
                "UNAVAILABLE" in status
                or "DEADLINE" in status
                or "connect" in msg
                or "unavailable" in msg
                or "timed out" in msg
                or status in ("500", "502", "503", "504")
            )
        return False

    async def _call(self, what: str, fn: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            try:
                self.calls += 1
                async with asyncio.timeout(self.retry.timeout_s):  # no extra task, unlike wait_for
                    return await fn()
            except (TimeoutError, InferenceServerException, OSError, aiohttp.ClientError) as e:
                last = e
            if not self._transient(last):
                raise BackendError(f"{what}: {str(last)[:300]}") from last
            if attempt + 1 < self.retry.attempts:
                d = self.retry.delay(attempt)
                log.info(
                    "inference server unavailable, retrying",
                    extra={"what": what, "attempt": attempt + 1, "delay_s": round(d, 2)},
                )
                await asyncio.sleep(d)
        raise BackendUnavailable(
            f"{what}: inference server unavailable after {self.retry.attempts} attempts ({type(last).__name__})"
        ) from last

    async def _infer_chunk(
        self, model: str, version: str, input_name: str, x: np.ndarray, outputs: list[str]
    ) -> dict[str, np.ndarray]:
        mod = self._mod
        inp = mod.InferInput(input_name, list(x.shape), "FP32")
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=False)
            outs = [mod.InferRequestedOutput(o, binary_data=False) for o in outputs]
        else:
            inp.set_data_from_numpy(x)
            outs = [mod.InferRequestedOutput(o) for o in outputs]
        # the HTTP client reads bodies with aiohttp's auto-decompression off: ask for an uncompressed reply
        kw = (
            {"headers": {"Accept-Encoding": "identity", "Content-Type": "application/json"}}
            if self.protocol == "http"
            else {}
        )
        res = await self._call(
            f"infer {model}", lambda: self._client.infer(model, [inp], model_version=version, outputs=outs, **kw)
        )
        return {o: res.as_numpy(o) for o in outputs}

    async def infer(
        self, model: str, version: str, input_name: str, x: np.ndarray, outputs: list[str]
    ) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= self.max_batch_size:
            return await self._infer_chunk(model, version, input_name, x, outputs)
        parts = await asyncio.gather(
            *(self._infer_chunk(model, version, input_name, c, outputs) for c in _chunks(x, self.max_batch_size))
        )
        return {o: np.concatenate([p[o] for p in parts]) for o in outputs}

    async def ready(self, model: str | None = None, version: str = "") -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            if not await asyncio.wait_for(self._client.is_server_ready(), self.retry.timeout_s):
                return False
            if model is not None:
                return bool(await asyncio.wait_for(self._client.is_model_ready(model, version), self.retry.timeout_s))
            return True
        except (TimeoutError, InferenceServerException, OSError, aiohttp.ClientError):
            return False

    async def load(self, model: str, version: str = "") -> None:
        await self._call(f"load {model}", lambda: self._client.load_model(model))

    async def unload(self, model: str) -> None:
        await self._call(f"unload {model}", lambda: self._client.unload_model(model))

    async def close(self) -> None:
        await self._client.close()


def make_backend(
    url: str | None, protocol: str, repo: Path, retry: RetryPolicy | None = None, device: str = "cpu"
) -> Backend:
    if not url:
        return EmbeddedBackend(repo, device)
    return TritonBackend(url, protocol, retry)
