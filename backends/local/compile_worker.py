"""Grammar compiles tried first in killable worker processes: a compile that passes its
deadline is killed, so it stops taking CPU and memory (a thread cannot be stopped; xgrammar
compiles a hostile 24 KB schema for 11 CPU-seconds on the demo tokenizer).

    check(kind, text, timeout_s)   compile it in an idle worker (or a fresh one): returns
                                   when it compiled in time, else raises

What the worker compiles is thrown away: the gateway compiles the grammar again itself
(backends/local/grammar.py), which, the same work on the same input, ends as the worker's did.
Why not send the worker's result: xgrammar's serialized CompiledGrammar (serialize_json) is
10-25x its memory size and grows with the square of a schema's properties (150 integer ranges:
compiled in 0.10 s, 0.8 MB in memory, 20 MB of JSON that took 0.93 s to write and 0.39 s to
read back), so shipping it cost 10-100x the compile; compiling twice costs 2x.

A worker is a process forked by multiprocessing's forkserver (a fresh interpreter that loaded
this module, and so xgrammar and torch, once: safe beside the gateway's torch threads, where a
plain fork is not). The forkserver starts with the backend, in the background (about 2 s,
once per gateway process); a worker then starts in about 10 ms. Each worker builds the
TokenizerInfo once, from its serialized form, and compiles one job at a time at the CPU pool's
lower priority (gateway/core/cpu.py: NICE). As with any multiprocessing user, a script that
embeds the backend needs the `if __name__ == "__main__":` guard (the worker imports the main
module, as multiprocessing does).

The deadline is the worker's own CPU time since the job was sent (/proc/PID/stat), so a
compile is refused for what it costs, never because the machine was busy; a wall-clock bound
of WALL_FACTOR times it backs that up (and stands alone where /proc is absent). At the
deadline, or when every request waiting for the compile went away, the worker is killed
(SIGKILL) and the next compile gets a fresh one. Idle workers are kept warm, at most as many
as the CPU pool has slots (a compile holds a slot while it runs, so no more run at once).

Memory: the workers and the forkserver are other processes; `memory_bytes()` sums their PSS
(pages shared between processes split among them; the forkserver's heap after importing torch
is most of it), which the backend names `grammar_workers` in its memory snapshot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import NoReturn

import xgrammar as xgr

from gateway.core import cpu
from gateway.core.procmem import read_process_memory

log = logging.getLogger(__name__)

JSON_SCHEMA, STRUCTURAL_TAG = b"j", b"t"  # what a job's text is
_OK, _REFUSED, _READY = b"+", b"-", b"ready"
START_TIMEOUT_S = 60.0  # a worker that is not ready by then (a stuck forkserver) is a 500
WALL_FACTOR = 10.0  # wall-clock bound of a compile, in multiples of its CPU deadline
TICK_S = 0.05  # how often a compile's CPU time is read while it runs
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CompileTimeout(Exception):
    """The compile passed its deadline; its worker was killed."""


class CompileRefused(Exception):
    """xgrammar refused the grammar; `detail` is its full message (for the log only)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class CompileFailed(Exception):
    """No answer: the worker could not start, or died without answering."""


# ---------------------------------------------------------------------------- the worker


def _die_with_parent() -> None:
    """SIGKILL this process when its parent (the forkserver) exits (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _exit() -> NoReturn:
    """End a worker without the interpreter's finalization: nothing is left to flush, and
    nanobind (xgrammar's binding layer) would print the compiler it still holds as a leak
    on the gateway's stderr (a non-JSON line in a JSON log)."""
    os._exit(0)


def _worker_main(conn: Connection, info_json: str) -> None:
    """A worker's life; any failure ends it without a traceback on the gateway's stderr (the
    gateway sees the process gone: a worker started just as the gateway closed found the
    pipe broken, and multiprocessing printed that in the middle of a JSON log)."""
    try:
        _serve(conn, info_json)
    except BaseException:  # the process ends here, whatever it was
        os._exit(1)
    _exit()


def _serve(conn: Connection, info_json: str) -> None:
    """Build the TokenizerInfo once, then answer jobs until the gateway closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C of the gateway's terminal: its concern
    _die_with_parent()
    cpu.lower_priority()
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send_bytes(_READY)
    while True:
        try:
            job = conn.recv_bytes()
        except (EOFError, OSError):
            _exit()
        kind, text = job[:1], job[1:].decode()
        try:
            if kind == JSON_SCHEMA:
                compiler.compile_json_schema(text, any_whitespace=False)
            else:
                compiler.compile_structural_tag(text)
            answer = _OK
        except Exception as exc:  # xgrammar's errors (RuntimeError, ValueError, its own)
            answer = _REFUSED + str(exc).encode(errors="replace")
        try:
            conn.send_bytes(answer)
        except OSError:  # the gateway stopped waiting
            _exit()
        cpu.trim_heap()  # a large grammar's buffers go back to the OS between jobs


# ---------------------------------------------------------------------------- the pool


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def cpu_seconds(self) -> float | None:
        """user + system CPU time of the worker (every thread), None where /proc does not say."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            return None


def _context() -> BaseContext:
    """forkserver where the platform has it (workers fork from a clean, single-purpose
    process that preloaded this module), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # The forkserver imports these once (the main module as multiprocessing runs it in a
    # child, then this one), so each child finds its imports done. Not the main module by
    # name too: runpy then warns on stderr that it is in sys.modules already (a non-JSON line
    # in a JSON log). Takes effect when the forkserver starts (once a process).
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


class CompileWorkers:
    """Worker processes compiling grammars for one tokenizer."""

    def __init__(self, info: xgr.TokenizerInfo, keep: Callable[[], int] | None = None) -> None:
        self._info_json = info.serialize_json()
        self._keep = keep if keep is not None else (lambda: cpu.pool().workers)
        self._ctx: BaseContext | None = None
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._server_pid: int | None = None  # the forkserver: the workers' parent
        self._warming: concurrent.futures.Future[None] | None = None  # prestart's
        self._closed = False
        self.started = 0  # workers started, for tests and telemetry
        self.killed = 0  # workers killed (deadline, cancelled, surplus, close)

    # ---- lifecycle --------------------------------------------------------------------

    def prestart(self) -> None:
        """Start the forkserver and one warm worker on a background thread (a compile asked
        for meanwhile waits for that worker rather than starting another)."""
        with self._lock:
            if self._warming is not None:
                return
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._warming = done
        threading.Thread(target=self._prestart, args=(done,), name="grammar-worker-start",
                         daemon=True).start()

    def _prestart(self, done: concurrent.futures.Future[None]) -> None:
        try:
            self._put_back(self._start())
        except CompileFailed as exc:
            log.warning("grammar compile worker did not start: %s", exc)
        finally:
            done.set_result(None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
        for w in workers:
            self._kill(w)

    def pids(self) -> list[int]:
        """Live workers (idle and busy)."""
        with self._lock:
            return [w.pid for w in (*self._idle, *self._busy)]

    def busy_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._busy]

    def memory_bytes(self) -> int:
        """PSS of the workers and of the forkserver they fork from (0 where unknown)."""
        pids = self.pids()
        if self._server_pid is not None:
            pids.append(self._server_pid)
        return sum(read_process_memory(str(pid)).pss or 0 for pid in pids)

    # ---- compiling --------------------------------------------------------------------

    async def check(self, kind: bytes, text: str, timeout_s: float) -> None:
        """Compile `text` (a JSON schema or a structural tag, by `kind`) in a worker. Returns
        when it compiled within `timeout_s` CPU seconds of the worker (and WALL_FACTOR times
        that in wall time); raises CompileTimeout past them, CompileRefused, CompileFailed.
        Cancelling it kills the worker."""
        worker = await self._acquire()
        answer = b""
        try:
            try:
                worker.conn.send_bytes(kind + text.encode())
            except OSError as exc:
                raise CompileFailed(f"worker {worker.pid} is gone: {exc}") from None
            await self._wait(worker, timeout_s)
            try:  # short: a status, or xgrammar's message
                answer = worker.conn.recv_bytes()
            except (EOFError, OSError) as exc:
                raise CompileFailed(f"worker {worker.pid} died while compiling: "
                                    f"{exc or 'no answer'}") from None
        finally:
            if answer:
                self._put_back(worker)
            else:
                self._kill(worker)
        if answer[:1] != _OK:
            raise CompileRefused(answer[1:].decode(errors="replace"))

    async def _acquire(self) -> _Worker:
        warming = self._warming
        if warming is not None and not warming.done():
            await asyncio.shield(asyncio.wrap_future(warming))
        while True:
            with self._lock:
                if self._closed:
                    raise CompileFailed("the grammar compiler is closed")
                worker = self._idle.pop() if self._idle else None
                if worker is not None:
                    self._busy.add(worker)
            if worker is None:
                break
            if worker.process.is_alive():
                return worker
            self._kill(worker)  # died while idle (killed from outside): take another
        start = asyncio.ensure_future(asyncio.to_thread(self._start))
        try:
            worker = await asyncio.shield(start)
        except asyncio.CancelledError:  # the start goes on; its worker is kept for the next
            start.add_done_callback(self._adopt)
            raise
        with self._lock:
            self._busy.add(worker)
        return worker

    def _adopt(self, start: asyncio.Future[_Worker]) -> None:
        if not start.cancelled() and start.exception() is None:
            self._put_back(start.result())

    def _start(self) -> _Worker:
        """A new worker, ready (blocking: run on a thread)."""
        if self._ctx is None:
            self._ctx = _context()
        parent, child = self._ctx.Pipe(duplex=True)
        process: BaseProcess = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child, self._info_json), name="grammar-compile",
            daemon=True)
        try:
            process.start()
        except (OSError, RuntimeError) as exc:
            parent.close()
            raise CompileFailed(f"cannot start a worker: {exc}") from None
        finally:
            child.close()
        worker = _Worker(process, parent)
        try:
            if not parent.poll(START_TIMEOUT_S) or parent.recv_bytes() != _READY:
                raise CompileFailed(f"worker {worker.pid} not ready in {START_TIMEOUT_S:g} s")
        except (EOFError, OSError) as exc:
            self._kill(worker)
            raise CompileFailed(f"worker {worker.pid} exited while starting: {exc}") from None
        except CompileFailed:
            self._kill(worker)
            raise
        self.started += 1
        ppid = _parent_pid(worker.pid)  # the forkserver (a new one, if the last one died)
        if ppid is not None and ppid != os.getpid():
            self._server_pid = ppid
        return worker

    async def _wait(self, worker: _Worker, timeout_s: float) -> None:
        """Until the worker answers; CompileTimeout past the deadline."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()
        loop.add_reader(fd, _settle, answered)
        try:
            start, cpu0 = loop.time(), worker.cpu_seconds()
            tick = min(TICK_S, timeout_s)
            while not answered.done():
                await asyncio.wait([answered], timeout=tick)
                if answered.done():
                    return
                now, cpu_now = loop.time(), worker.cpu_seconds()
                used = cpu_now - cpu0 if cpu_now is not None and cpu0 is not None \
                    else now - start
                if used >= timeout_s or now - start >= timeout_s * WALL_FACTOR:
                    raise CompileTimeout
        finally:
            loop.remove_reader(fd)

    # ---- keeping and killing ----------------------------------------------------------

    def _put_back(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if not self._closed and len(self._idle) < self._keep() and \
                    worker.process.is_alive():
                self._idle.append(worker)
                return
        self._kill(worker)

    def _kill(self, worker: _Worker) -> None:
        """SIGKILL: the compile stops now and its memory goes back to the OS."""
        with self._lock:
            self._busy.discard(worker)
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if worker.process.is_alive():
                worker.process.kill()
                self.killed += 1
        worker.conn.close()
        # the forkserver reaps the process; join without waiting frees our side of it
        with contextlib.suppress(OSError, ValueError, AssertionError):
            worker.process.join(0)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None

