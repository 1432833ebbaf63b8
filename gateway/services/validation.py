"""FHIR model validation off the event loop, in worker processes for large bundles.

Validating against the fhir.resources models is the most expensive step of ingest (≈ 0.4 ms per
resource, pure Python under the GIL), so a thread does not add throughput.  Large transaction and
batch bundles are validated in a small process pool (``Settings.validation_workers``; 0 = in a thread)
while the event loop and the database thread work on other requests.  The pool starts lazily on the
first large bundle, with the ``spawn`` method (no fork of a running event loop).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mappings.fhir.validate import Issue, model_issues_many

log = logging.getLogger(__name__)

#: Bundles with more resources than this go to the pool (smaller ones are validated in a thread).
POOL_THRESHOLD = 20


class ModelValidator:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def issues(self, resources: list[Any]) -> dict[int, list[Issue]]:
        """Model issues of each invalid resource, by position (envelope problems are not reported here)."""
        loop = asyncio.get_running_loop()
        pool = self._executor() if len(resources) > POOL_THRESHOLD else None
        found = None
        if pool is not None:
            try:
                found = await loop.run_in_executor(pool, model_issues_many, resources)
            except BrokenProcessPool:  # a worker died (OOM kill, ...): start a new pool next time
                log.warning("validation worker pool broke; validating in a thread")
                self.close()
        if found is None:
            found = await asyncio.to_thread(model_issues_many, resources)
        return {i: [Issue(e, m) for e, m in issues] for i, issues in found}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
