"""The bounded, tenant-fair executor for per-request CPU work (tokenizing large inputs,
trimming, grammar compilation): the event loop only routes.

    slot(tenant)      wait for one of `workers` slots, then hold it until the block ends
    run(tenant, fn)   fn() on a pool thread while holding a slot of `tenant`'s

Fairness: when a slot frees and tenants wait, it goes to the waiting tenant that holds the
fewest slots now (ties: the one that has waited longest), so no tenant holds more than an
equal share while another waits; a tenant alone may use every slot. Work that must stop at a
deadline and cannot be stopped in a thread (grammar compilation) holds a slot while a worker
process does it (backends/local/compile_worker.py) and kills that process at the deadline.

One pool per process, like torch's thread pool: `pool()` is it, `configure(workers)` sizes
it from `server.cpu_workers` (the app does, at start and on reload). A reload that shrinks it
lets the slots held finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.core.context import RequestContext

T = TypeVar("T")


def auto_workers() -> int:
    """`cpu_workers: auto`: the cores this process may use, at least 1, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class CpuPool:
    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a CPU pool needs at least one worker")
        self.workers = workers
        self.held: Counter[str] = Counter()  # tenant -> slots held now
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._ticket = itertools.count()
        self._threads = _executor(workers)
        self.runs = 0  # jobs started, for tests and telemetry
        self.waits = 0  # jobs that queued for a slot
        self._trim_due = False

    @property
    def busy(self) -> int:
        return sum(self.held.values())

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def resize(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a CPU pool needs at least one worker")
        if workers != self.workers:
            old, self._threads = self._threads, _executor(workers)
            old.shutdown(wait=False)
            self.workers = workers
            self._hand_over()

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        await self._acquire(tenant)
        try:
            yield
        finally:
            self._release(tenant)

    async def run(self, tenant: str, fn: Callable[[], T]) -> T:
        """fn() on a pool thread. Cancelling the caller frees its place in the queue; a job
        already running finishes and holds its slot until then (every job run here is
        bounded by the request bounds, and linear in them)."""
        await self._acquire(tenant)
        self.runs += 1
        loop = asyncio.get_running_loop()
        try:
            job = self._threads.submit(fn)
        except BaseException:
            self._release(tenant)
            raise
        # the slot is held until the thread is done, even when the caller stops waiting
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, tenant))
        return await asyncio.wrap_future(job)

    def release_heap(self) -> None:
        """Give the heap's free pages back to the OS (a large request's end: its parsed body
        and token ids were freed on the event loop's thread): once, TRIM_DELAY_S later, for
        every large request that ended meanwhile, on a thread of its own at normal priority.
        malloc_trim holds each arena's lock while it walks it: run for every request of a
        flood of 3 MB bodies at nice 10 (preempted while holding the main arena's lock), it
        stalled the event loop and the engine for seconds."""
        if self._trim_due:
            return
        self._trim_due = True
        asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim)

    def _trim(self) -> None:
        self._trim_due = False
        with contextlib.suppress(RuntimeError):  # shut down at exit
            _trimmer.submit(trim_heap)

    async def _acquire(self, tenant: str) -> None:
        if self.busy < self.workers and not self._waiting:
            self.held[tenant] += 1
            return
        self.waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._ticket), fut)
        self._waiting.setdefault(tenant, deque()).append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled
                self._release(tenant)
            else:
                queue = self._waiting.get(tenant)
                if queue is not None and entry in queue:
                    queue.remove(entry)
                    if not queue:
                        del self._waiting[tenant]
            raise

    def _release(self, tenant: str) -> None:
        self.held[tenant] -= 1
        if self.held[tenant] <= 0:
            del self.held[tenant]
        self._hand_over()

    def _hand_over(self) -> None:
        """Free slots to waiting tenants: the one holding fewest first, then the oldest."""
        while self._waiting and self.busy < self.workers:
            tenant = min(self._waiting, key=lambda t: (self.held[t], self._waiting[t][0][0]))
            queue = self._waiting[tenant]
            _, fut = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if fut.cancelled():
                continue
            self.held[tenant] += 1
            fut.set_result(None)


# Work on inputs up to this size runs inline on the event loop: tokenizing 16 KiB takes well
# under a millisecond, less than handing it to a thread costs (the hot path of small requests).
INLINE_BYTES = 16 * 1024


async def offload(tenant: str, size: int, fn: Callable[[], T]) -> T:
    """fn() inline when the input it works on (`size` bytes) is small, else on the pool."""
    if size <= INLINE_BYTES:
        return fn()
    return await pool().run(tenant, fn)


# The pool's threads run at a low CPU priority (nice 10, per thread on Linux): a
# tenant's large input is worked on from the cores that serving leaves idle, so it cannot
# slow the engine's steps and the event loop of every other tenant (measured with the
# hostile-neighbour test: tests/e2e/security/test_hostile_neighbour.py). Not nice 19 or
# SCHED_IDLE: under full load the work still advances (about a tenth of a core; at nice 19
# a 3.5 MB prompt took 174 s beside a busy engine).
NICE = 10


def lower_priority() -> None:
    """This thread (or process) at nice NICE; where the OS refuses, as it is."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def _libc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_MALLOC_TRIM = _libc_trim()
TRIM_DELAY_S = 2.0
_trimmer = ThreadPoolExecutor(1, thread_name_prefix="gateway-trim")


def trim_heap() -> None:
    """glibc's malloc_trim(0): free pages of every arena go back to the OS. The engine raises
    glibc's trim threshold (backends/local/placement.py: tune_malloc), so the buffers of a
    large body (its bytes, its parsed text, a rendered chat) stay in the process's RSS, and
    in /debug/memory's `other`, after the request: measured with the hostile-neighbour test,
    19 requests of 3.5 MB left RSS 90 MB higher without this, 5% with it. A few ms on a
    fragmented heap, on a pool thread."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="gateway-cpu",
                              initializer=lower_priority)


async def count_prompt(ctx: RequestContext,
                       counter: Callable[[RequestContext], int | None]) -> int | None:
    """ctx.prompt_tokens, counted once by `counter` (a backend's count_tokens): inline when
    the request is small, on the pool when it is large. None: the backend cannot count."""
    if ctx.prompt_tokens is None:
        ctx.prompt_tokens = await offload(ctx.tenant, ctx.body_bytes, lambda: counter(ctx))
    return ctx.prompt_tokens


_pool: CpuPool | None = None


def pool() -> CpuPool:
    """This process's pool (sized by `configure`; `auto` until then)."""
    global _pool
    if _pool is None:
        _pool = CpuPool(auto_workers())
    return _pool


def configure(workers: int | str) -> CpuPool:
    """Size this process's pool: an integer, or "auto"."""
    n = auto_workers() if workers == "auto" else int(workers)
    p = pool()
    p.resize(n)
    return p
