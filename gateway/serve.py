"""``fedgate serve`` with several server processes sharing one port (setting ``processes``).

One event loop uses about one core; a CPU-bound mix (STOW parsing and indexing, WADO streaming, FHIR
validation) needs more.  With ``processes = N`` (N > 1) the parent:

1. binds N listening sockets to the port with ``SO_REUSEPORT`` (so a busy port fails at once, and the
   kernel spreads new connections over the N sockets);
2. does the one-time start-up by running the application once with ``startup="once"``: migrations,
   consent indexes and policy recompute, blob-store reconcile (which deletes stray temp files — never
   safe while another process is receiving), the shipped model cards (see :data:`gateway.keys.STARTUP`);
3. starts N children (``python -m gateway serve ... --serve-child FD:INDEX:PARENT``), each serving one
   of the sockets with ``startup="serve"`` and every route (the kernel picks the process, so every
   process must answer everything the same way: shared state lives in the database);
4. supervises: a child that exits while the parent is running is logged and restarted (its socket is
   held by the parent meanwhile, so connections queue instead of being refused); a child that keeps
   dying within seconds of its start makes the parent stop everything and exit 1 (a broken
   configuration, not a crash to paper over).  SIGTERM/SIGINT: the children get SIGTERM and shut down
   gracefully (requests finished, audit flushed), then the parent exits.

Children die with the parent even when it is SIGKILLed: ``PR_SET_PDEATHSIG`` (Linux) plus a thread that
watches the parent pid, as the worker pools do (:mod:`gateway.services.workers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from gateway.services.workers import end_with_parent, tune_gc
from gateway.settings import Settings

log = logging.getLogger("gateway.serve")

SHUTDOWN_TIMEOUT_S = 10.0
#: A child that exits within this many seconds of its start counts as failing to start.
QUICK_EXIT_S = 10.0
#: Consecutive quick exits of one child before the parent gives up.
MAX_QUICK_EXITS = 5


def bind_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` sockets bound to ``host:port`` with SO_REUSEPORT (port 0: the first one's port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    if port:
        # SO_REUSEPORT would also let us share the port with *another* server that set it (a second fedgate
        # started by mistake would silently take half the connections): a plain bind fails if anyone listens
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(addr)
            addr = s.getsockname()  # port 0 → every further socket takes the same port
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


async def _one_time_startup(settings: Settings) -> None:
    from aiohttp import web

    from gateway.app import create_app

    runner = web.AppRunner(create_app(settings, startup="once"))
    await runner.setup()  # runs every cleanup_ctx up to its yield: the one-time work
    await runner.cleanup()


class _Child:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index, self.sock = index, sock
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.quick_exits = 0


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.serve_processes`` serving children and supervise them (see the module docstring).
    ``argv``: this ``fedgate serve`` command line; the children get the same (same settings)."""
    n = settings.serve_processes
    try:
        socks = bind_sockets(settings.host, settings.port, n)
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", settings.host, settings.port, exc)
        return 1
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    children = [_Child(i, s) for i, s in enumerate(socks)]
    code = 0
    try:
        asyncio.run(_one_time_startup(settings))
        if stopping.is_set():
            return 0
        for s in socks:
            s.listen(1024)
        for c in children:
            _start(c, argv)
        log.info("serving", extra={"host": settings.host, "port": socks[0].getsockname()[1], "processes": n})
        while not stopping.is_set():
            for c in children:
                rc = c.proc.poll() if c.proc is not None else None
                if rc is None or stopping.is_set():
                    continue
                lived = time.monotonic() - c.started
                c.quick_exits = c.quick_exits + 1 if lived < QUICK_EXIT_S else 0
                log.error("server process exited; restarting it",
                          extra={"worker": c.index, "exit_code": rc, "seconds": round(lived, 1)})
                if c.quick_exits >= MAX_QUICK_EXITS:
                    log.error("server process keeps exiting at start-up; stopping", extra={"worker": c.index})
                    code = 1
                    stopping.set()
                    break
                _start(c, argv)
            stopping.wait(0.2)
    finally:
        _stop_all(children)
        for s in socks:
            s.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _start(c: _Child, argv: Sequence[str]) -> None:
    fd = c.sock.fileno()
    cmd = [sys.executable, "-m", "gateway", *argv, "--serve-child", f"{fd}:{c.index}:{os.getpid()}"]
    # own process group: a terminal's Ctrl-C reaches the parent only, which then stops the children in order
    c.proc = subprocess.Popen(cmd, pass_fds=(fd,), process_group=0)
    c.started = time.monotonic()


def _stop_all(children: list[_Child]) -> None:
    live = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S + 10
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("server process did not stop; killing it", extra={"worker": p.pid})
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------ child


def die_with_parent(parent: int) -> None:
    """SIGTERM this process (a graceful stop) when ``parent`` is gone, even after its SIGKILL."""

    def gone() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(SHUTDOWN_TIMEOUT_S + 5)  # the graceful stop did not end the process
        os._exit(1)

    end_with_parent(parent, gone, signal.SIGTERM)


def serve_child(settings: Settings, spec: str) -> int:
    """One serving process: ``spec`` = ``FD:INDEX:PARENT`` (the inherited listening socket)."""
    from aiohttp import web

    from gateway.app import create_app

    fd, index, parent = (int(x) for x in spec.split(":"))
    die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    log.info("server process ready", extra={"worker": index})
    app = create_app(settings, startup="serve")
    tune_gc()
    web.run_app(app, sock=sock, print=None, access_log=None,
                shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    return 0


__all__ = ["bind_sockets", "die_with_parent", "serve_child", "supervise"]
