"""A lazily started process pool for CPU-heavy pure work (FHIR model validation, DICOM parsing).

Python threads do not add CPU throughput for pure-Python work (the GIL); a few ``spawn`` worker
processes do, while the event loop and the database thread serve other requests.  With 0 workers
(or when a worker dies) the work runs in a thread instead, so correctness never depends on the pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

log = logging.getLogger(__name__)


def end_with_parent(parent: int, on_gone: Callable[[], None], signum: int = signal.SIGTERM) -> None:
    """End this process when ``parent`` is gone, even after its SIGKILL (when no shutdown of it runs),
    instead of lingering as an orphan: Linux delivers ``signum`` (PR_SET_PDEATHSIG); elsewhere, and as a
    back-up, a thread that notices the parent changing calls ``on_gone``.  Used by the worker pool's
    processes and by the server processes of ``fedgate serve --processes N``."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        on_gone()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


#: allocations (of container objects) between two young-generation collections in a serving process
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Fewer garbage collections in a long-running serving or worker process. Per-request work allocates
    many short-lived dicts and tuples (DICOM elements, JSON, rows), and Python's default (a young
    collection every 700 net allocations) spends a measurable share of the event loop in the collector;
    the objects alive after start-up (modules, dictionaries, the app) are moved out of the collector's
    sight (``gc.freeze``), so that older-generation passes do not walk them again and again. Reference
    counting still frees almost everything at once; cycles are still collected, only less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _exit_with_parent() -> None:
    """Worker initializer: end this worker when the gateway process is gone (and tune its collector)."""
    end_with_parent(os.getppid(), lambda: os._exit(0))
    tune_gc()


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_exit_with_parent)
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
