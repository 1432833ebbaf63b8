"""FHIR model validation off the event loop, in worker processes for large bundles.

Validating against the fhir.resources models is the most expensive step of ingest (pure Python
under the GIL), so a thread does not add throughput.  Large transaction and
batch bundles are validated in the worker pool (``Settings.validation_workers``; 0 = in a thread)
while the event loop and the database thread work on other requests.
"""

from __future__ import annotations

from typing import Any

from gateway.services.workers import WorkerPool
from mappings.fhir.validate import Issue, model_issues_many

#: Bundles with more resources than this go to the pool (smaller ones are validated in a thread).
POOL_THRESHOLD = 20


class ModelValidator:
    def __init__(self, workers: int | WorkerPool) -> None:
        self.pool = workers if isinstance(workers, WorkerPool) else WorkerPool(workers)

    async def issues(self, resources: list[Any]) -> dict[int, list[Issue]]:
        """Model issues of each invalid resource, by position (envelope problems are not reported here)."""
        found = await self.pool.run(model_issues_many, resources, in_process=len(resources) > POOL_THRESHOLD)
        return {i: [Issue(e, m) for e, m in issues] for i, issues in found}

    def close(self) -> None:
        self.pool.close()
