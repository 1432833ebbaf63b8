"""A lazily started process pool for CPU-heavy pure work (FHIR model validation, DICOM parsing).

Python threads do not add CPU throughput for pure-Python work (the GIL); a few ``spawn`` worker
processes do, while the event loop and the database thread serve other requests.  With 0 workers
(or when a worker dies) the work runs in a thread instead, so correctness never depends on the pool.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def run(self, fn: Callable[..., Any], *args: Any, in_process: bool = True) -> Any:
        """``fn(*args)`` in a worker process (``fn`` and its arguments must pickle), else in a thread."""
        pool = self._executor() if in_process else None
        if pool is not None:
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
            except BrokenProcessPool:  # a worker died (OOM kill, ...): start a new pool next time
                log.warning("worker pool broke; running in a thread")
                self.close()
        return await asyncio.to_thread(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
