"""``fedgate serve`` with several server processes sharing one port (setting ``processes``).

One event loop uses about one core; a CPU-bound mix (STOW parsing and indexing, WADO streaming, FHIR
validation) needs more.  With ``processes = N`` (N > 1) the parent:

1. binds the port (one listening socket; a busy port fails at once);
2. does the one-time start-up by running the application once with ``startup="once"``: migrations,
   consent indexes and policy recompute, blob-store reconcile (which deletes stray temp files — never
   safe while another process is receiving), the shipped model cards (see :data:`gateway.keys.STARTUP`);
3. starts N children (``python -m gateway serve ... --serve-child FD:INDEX:PARENT``), each with one end
   of a Unix socket pair (``FD``) to the parent, serving every route with ``startup="serve"`` (any
   process may get any connection, so every process must answer everything the same way: shared state
   lives in the database);
4. accepts the connections itself and hands each (``SCM_RIGHTS``) to the child with the fewest open
   connections (:class:`_Dispatcher`; the children report theirs). HTTP clients keep their connections
   open: a PACS or a viewer opens a handful and sends everything over them, so where the connections
   land decides where the work goes. With ``SO_REUSEPORT`` (one listening socket per child, the kernel
   hashing each connection to one; before 2026-12-03) 4 connections landed all in one process one time
   in 8 and 3 + 1 one time in 2, an uneven load (figures in bench/RESULTS.md). With ``dimse_port`` set the
   parent binds that port too and hands each DIMSE connection (one association) the same way, to the child
   with the fewest open associations, marked when ``dimse_max_associations`` are open in all children
   together (that child rejects the association: the limit holds for the gateway, not per process);
5. supervises: a child that exits while the parent is running is logged and restarted (connections
   meanwhile go to the others; with none left, they wait in the parent until one is back); a child
   that keeps dying within seconds of its start makes the parent stop everything and exit 1 (a broken
   configuration, not a crash to paper over).  SIGTERM/SIGINT: the children get SIGTERM and shut down
   gracefully (requests finished, audit flushed), then the parent exits.

Children die with the parent even when it is SIGKILLed: ``PR_SET_PDEATHSIG`` (Linux) plus a thread that
watches the parent pid, as the worker pools do (:mod:`gateway.services.workers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Sequence

from aiohttp import web

from gateway import keys
from gateway.metrics import process_gone
from gateway.services.workers import end_with_parent, tune_gc
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.handlers.dimse import DimseListener

log = logging.getLogger("gateway.serve")

SHUTDOWN_TIMEOUT_S = 10.0
#: A child that exits within this many seconds of its start counts as failing to start.
QUICK_EXIT_S = 10.0
#: Consecutive quick exits of one child before the parent gives up.
MAX_QUICK_EXITS = 5


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port). A plain bind (no ``SO_REUSEPORT``): a port that
    anyone listens on fails at once, instead of a second server silently sharing it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError:
        s.close()
        raise
    return s


async def _one_time_startup(settings: Settings) -> None:
    from aiohttp import web

    from gateway.app import create_app

    runner = web.AppRunner(create_app(settings, startup="once"))
    await runner.setup()  # runs every cleanup_ctx up to its yield: the one-time work
    await runner.cleanup()


#: A child's load report: HTTP connections it has taken over in all and open now, then the same for DIMSE.
_REPORT = struct.Struct("!QIQI")
#: The hand-over messages (with the descriptor): an HTTP connection, a DIMSE one, a DIMSE one over the limit.
_HTTP, _DIMSE, _DIMSE_OVER = b"c", b"d", b"r"
#: How long an accepted connection may wait in the parent for a serving process (all restarting).
PENDING_TIMEOUT_S = 30.0


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.quick_exits = 0
        self.ctrl: socket.socket | None = None  # the parent's end of the socket pair; None: not serving
        self.handed = 0  # connections handed to this process (since its start)
        self.taken = 0  # ... of which it has reported taking over
        self.open = 0  # its open connections, as last reported
        self.dimse_handed = self.dimse_taken = self.dimse_open = 0  # the same for DIMSE associations
        self.last = 0  # sequence number of the last hand-over (ties go to the longest unused)

    def load(self) -> int:
        return self.open + self.handed - self.taken

    def dimse_load(self) -> int:
        return self.dimse_open + self.dimse_handed - self.dimse_taken


class _Dispatcher:
    """Accepts connections on the listening socket and hands each to the serving process with the fewest
    open connections (handed over but not yet reported count as open). Runs in a thread of the parent;
    the children's reports arrive on the same socket pairs.

    With a DIMSE listening socket, its connections (associations) go the same way, balanced by the open
    associations of each process; one accepted while ``dimse_max`` associations are open in all processes
    together is handed over marked, and its process rejects it once requested ("local limit exceeded")."""

    def __init__(self, listener: socket.socket, children: list[_Child], dimse: socket.socket | None = None,
                 dimse_max: int = 0) -> None:
        self.listener = listener
        self.dimse = dimse
        self.dimse_max = dimse_max
        self.children = children
        self.lock = threading.Lock()  # children's ctrl sockets and counters (the supervisor replaces them)
        self.stopping = threading.Event()
        self.pending: list[tuple[socket.socket, float, bool]] = []  # (connection, accepted at, DIMSE)
        self.seq = 0
        self.thread = threading.Thread(target=self._run, name="fedgate-dispatch", daemon=True)

    def attach(self, c: _Child) -> socket.socket:
        """A new socket pair for ``c`` (started or restarted); returns the child's end (to pass it)."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_end.setblocking(False)
        with self.lock:
            self._detach(c)
            c.ctrl, c.handed, c.taken, c.open = parent_end, 0, 0, 0
            c.dimse_handed = c.dimse_taken = c.dimse_open = 0
        return child_end

    def _detach(self, c: _Child) -> None:
        if c.ctrl is not None:
            c.ctrl.close()
            c.ctrl = None

    def _run(self) -> None:
        listeners = [self.listener] if self.dimse is None else [self.listener, self.dimse]
        for sock in listeners:
            sock.setblocking(False)
        while not self.stopping.is_set():
            with self.lock:
                ctrls = {c.ctrl: c for c in self.children if c.ctrl is not None}
            try:
                readable, _, _ = select.select([*listeners, *ctrls], [], [], 0.2)
            except (OSError, ValueError):  # a ctrl socket closed by the supervisor meanwhile
                continue
            with self.lock:
                for sock in readable:
                    c = ctrls.get(sock)
                    if c is not None and c.ctrl is sock:
                        self._read_reports(c)
                for sock in listeners:
                    if sock in readable:
                        self._accept(sock)
                self._hand_pending()

    def _read_reports(self, c: _Child) -> None:
        while True:
            try:
                msg = c.ctrl.recv(64)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if len(msg) != _REPORT.size:  # end of file: the child is gone (or stopping)
                self._detach(c)
                return
            c.taken, c.open, c.dimse_taken, c.dimse_open = _REPORT.unpack(msg)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it in the backlog, try again on the next round
                log.warning("accept failed: %s", exc.strerror)
                return
            self.pending.append((conn, time.monotonic(), listener is self.dimse))

    def _hand_pending(self) -> None:
        keep = []
        for conn, since, dimse in self.pending:
            if self._hand(conn, dimse):
                conn.close()  # (the child has its own descriptor now)
            elif time.monotonic() - since > PENDING_TIMEOUT_S:
                conn.close()
            else:
                keep.append((conn, since, dimse))
        self.pending = keep

    def _hand(self, conn: socket.socket, dimse: bool = False) -> bool:
        serving = [c for c in self.children if c.ctrl is not None]
        if dimse:
            over = sum(c.dimse_load() for c in serving) >= self.dimse_max > 0
            kind, order = (_DIMSE_OVER if over else _DIMSE), (lambda c: (c.dimse_load(), c.load(), c.last))
        else:
            kind, order = _HTTP, (lambda c: (c.load(), c.dimse_load(), c.last))
        for c in sorted(serving, key=order):
            try:
                socket.send_fds(c.ctrl, [kind], [conn.fileno()])
            except OSError:  # gone (its restart attaches a new pair) or its queue full: the next one
                continue
            if dimse:
                c.dimse_handed += 1
            else:
                c.handed += 1
            self.seq += 1
            c.last = self.seq
            return True
        return False

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        with self.lock:
            for conn, _, _ in self.pending:
                conn.close()
            self.pending = []
            for c in self.children:
                self._detach(c)


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.serve_processes`` serving children and supervise them (see the module docstring).
    ``argv``: this ``fedgate serve`` command line; the children get the same (same settings)."""
    n = settings.serve_processes
    try:
        listener = bind_listener(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", settings.host, settings.port, exc)
        return 1
    dimse = None
    if settings.dimse_port:  # the DIMSE port too: each association goes to one of the serving processes
        try:
            dimse = bind_listener(settings.dimse_host or settings.host, settings.dimse_port)
        except OSError as exc:
            log.error("cannot bind the DIMSE port %s:%s: %s", settings.dimse_host or settings.host,
                      settings.dimse_port, exc)
            listener.close()
            return 1
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    children = [_Child(i) for i in range(n)]
    dispatcher = _Dispatcher(listener, children, dimse, settings.dimse_max_associations)
    code = 0
    try:
        asyncio.run(_one_time_startup(settings))
        if stopping.is_set():
            return 0
        listener.listen(1024)
        if dimse is not None:
            dimse.listen(1024)
        for c in children:
            _start(c, argv, dispatcher)
        dispatcher.thread.start()
        extra = {"url": f"http://{settings.host}:{listener.getsockname()[1]}", "processes": n}
        if dimse is not None:
            extra["dimse_port"] = dimse.getsockname()[1]
        log.info("serving", extra=extra)
        while not stopping.is_set():
            for c in children:
                rc = c.proc.poll() if c.proc is not None else None
                if rc is None or stopping.is_set():
                    continue
                lived = time.monotonic() - c.started
                process_gone(c.proc.pid)
                c.quick_exits = c.quick_exits + 1 if lived < QUICK_EXIT_S else 0
                log.error("server process exited; restarting it",
                          extra={"worker": c.index, "exit_code": rc, "seconds": round(lived, 1)})
                if c.quick_exits >= MAX_QUICK_EXITS:
                    log.error("server process keeps exiting at start-up; stopping", extra={"worker": c.index})
                    code = 1
                    stopping.set()
                    break
                _remove_temp_files(settings, c.proc.pid)
                _start(c, argv, dispatcher)
            stopping.wait(0.2)
    finally:
        if stopping.is_set():
            log.info("stopping", extra={"processes": sum(1 for c in children if c.proc is not None
                                                         and c.proc.poll() is None)})
        if dispatcher.thread.is_alive():
            dispatcher.stop()
        listener.close()  # no new connections while the children finish theirs
        if dimse is not None:
            dimse.close()
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _remove_temp_files(settings: Settings, pid: int) -> None:
    """A child that exited (crash, kill -9) leaves the temp files of the STOW parts it was receiving: they
    are removed now, not at the next parent start."""
    from pathlib import Path

    from gateway.store.blobs import BlobStore

    try:
        removed = BlobStore.remove_temp_files_of(Path(settings.data_dir) / "blobs", pid)
    except OSError as exc:
        log.warning("temp files of an exited server process not removed", extra={"error_type": type(exc).__name__})
        return
    if removed:
        log.warning("temp files of an exited server process removed", extra={"files_removed": removed})


def _start(c: _Child, argv: Sequence[str], dispatcher: _Dispatcher) -> None:
    child_end = dispatcher.attach(c)
    try:
        fd = child_end.fileno()
        cmd = [sys.executable, "-m", "gateway", *argv, "--serve-child", f"{fd}:{c.index}:{os.getpid()}"]
        # own process group: a terminal's Ctrl-C reaches the parent only, which then stops the children in order
        c.proc = subprocess.Popen(cmd, pass_fds=(fd,), process_group=0)
    finally:
        child_end.close()
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


class HandedSite(web.BaseSite):
    """An aiohttp site serving the connections the parent hands over (``SCM_RIGHTS`` on ``ctrl``, one
    descriptor per message) instead of a listening socket, and gives the DIMSE connections to the process's
    DIMSE listener (``dimse``); it reports its load back (``_REPORT``: taken over in all and open now, HTTP
    connections and DIMSE associations) whenever that changes, checked every :data:`REPORT_INTERVAL_S`."""

    __slots__ = ("_ctrl", "_dimse", "_taken", "_reported", "_poll", "_pending")

    def __init__(self, runner: web.BaseRunner, ctrl: socket.socket, dimse: DimseListener | None = None) -> None:
        super().__init__(runner)
        self._ctrl = ctrl
        self._dimse = dimse  # takes the DIMSE connections (associations) handed over
        self._taken = 0
        self._reported = (0, 0, 0, 0)
        self._poll: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return "connections handed over by the parent process"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._ctrl.setblocking(False)
        loop.add_reader(self._ctrl.fileno(), self._receive)
        self._poll = loop.create_task(self._report_loop())

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self._ctrl, 16, 4, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:  # the parent is gone: the graceful stop follows (die_with_parent)
                loop.remove_reader(self._ctrl.fileno())
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                if msg in (_DIMSE, _DIMSE_OVER):
                    self._take_dimse(conn, msg == _DIMSE_OVER)
                    continue
                conn.setblocking(False)
                task = loop.create_task(loop.connect_accepted_socket(self._runner.server, conn))
                self._pending.add(task)
                task.add_done_callback(self._taken_over)

    def _take_dimse(self, conn: socket.socket, over_limit: bool) -> None:
        conn.setblocking(True)
        if self._dimse is None:  # (no listener here: the settings differ from the parent's)
            conn.close()
            return
        self._dimse.take(conn, over_limit)
        self._report()

    def _taken_over(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        self._taken += 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("a handed-over connection could not be served: %s", type(task.exception()).__name__)
        self._report()

    def _report(self) -> None:
        server = self._runner.server
        dimse = self._dimse.counts() if self._dimse is not None else (0, 0)
        now = (self._taken, len(server.connections) if server is not None else 0, *dimse)
        if now != self._reported:
            try:
                self._ctrl.send(_REPORT.pack(*now))
            except OSError:  # (parent gone, or its queue full: the next report carries the totals)
                return
            self._reported = now

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            self._report()

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._ctrl.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self._ctrl.fileno())
            self._ctrl.close()  # the parent sees the end of file: no more connections for this process
        await super().stop()


#: How often a serving process checks whether its open connections changed (to report them).
REPORT_INTERVAL_S = 0.05


def serve_child(settings: Settings, spec: str) -> int:
    """One serving process: ``spec`` = ``FD:INDEX:PARENT`` (FD: its end of the socket pair)."""
    from gateway.app import create_app

    fd, index, parent = (int(x) for x in spec.split(":"))
    die_with_parent(parent)
    ctrl = socket.socket(fileno=fd)
    app = create_app(settings, startup="serve")
    tune_gc()
    asyncio.run(_serve(app, ctrl, index))
    return 0


async def _serve(app: web.Application, ctrl: socket.socket, index: int) -> None:
    """What ``web.run_app`` does, with a :class:`HandedSite`: serve until SIGTERM/SIGINT, then stop
    gracefully (no new connections, requests in progress finished within SHUTDOWN_TIMEOUT_S, cleanup)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await HandedSite(runner, ctrl, app[keys.DIMSE]).start()
        log.info("server process ready", extra={"worker": index})
        await stop.wait()
    finally:
        await runner.cleanup()


__all__ = ["HandedSite", "bind_listener", "die_with_parent", "serve_child", "supervise"]
