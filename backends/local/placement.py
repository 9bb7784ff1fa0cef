"""Where the engine's CPU work runs, decided per process and per engine thread.

- OpenMP teams. torch on CPU computes through libgomp (MKL and oneDNN too). Every thread that
  runs a parallel region owns a team whose worker threads live as long as it does, and libgomp
  counts the workers of every team in the process: once they outnumber the cores, every barrier
  of every team gives up spinning after ~100 rounds and sleeps in the kernel, so each parallel
  region pays a futex wake-up. One idle team of two (what the thread that loaded the model
  left) made a two-thread batch-1 decode step of the mid model 18.4 ms instead of 9.6 (one
  thread: 10.8) on the 2-vCPU VM (`python -m bench.step_ab --idle-team 2`, docs/performance.md "Engine
  speed"). Hence:
  - every thread but an engine's computes on one thread: `prepare_process` sets
    OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 before torch loads (`gateway serve` does it first)
    and torch's own default to 1;
  - an engine thread takes its team for itself (`enter_engine_thread`), sized by `claim` from
    the process's budget of cores - 1 workers (cores: this process's share when `--workers N`
    processes share them), so two engines (degrade tiers) never oversubscribe it (a reload's
    replacement engine shares its backend's claim while the old one drains); the caller then
    puts torch's default for new threads back to 1;
  - while other processes hold part of the cores, the engine thread's team shrinks to what
    they leave and grows back when they go (`Contention`, `decide`, `resize_engine_thread`).
- `server.torch_threads` (`gateway serve` passes it on as MEMGATE_TORCH_THREADS, which worker
  processes inherit) asks for an engine's threads; `auto` or unset takes `default_threads`,
  measured (docs/performance.md "Engine speed"): the whole share on up to 2 cores, else all but one core,
  which is left to the event loop (HTTP, tokenizing, streaming).
- glibc malloc. Step tensors above malloc's mmap threshold (128 KiB, raised as blocks are
  freed) came from fresh mappings every step and page-faulted on first touch; freed heap was
  trimmed back and faulted in again. Raising both thresholds keeps a step's workspace in the
  heap between steps: the memory a step needs stays resident (the ledger counts its peak as
  `workspace`), and larger allocations (the KV pool, weights) are still mapped.

This module imports torch only inside functions, so `prepare_process` can run before it loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.worker import local_workers

log = logging.getLogger(__name__)

ENV = "MEMGATE_TORCH_THREADS"
RUNTIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # every other thread's default: 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for this parameter on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_lock = threading.Lock()
_claims: dict[str, list[int]] = {}  # owner -> [threads granted, engines holding them]
_anonymous = 0  # engines that name no owner get one each


def affinity() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cores() -> int:
    """The cores this process may run on, divided among `gateway serve --workers N`."""
    return max(1, len(affinity()) // local_workers())


def default_threads(cores: int) -> int:
    """The measured default: every core on up to two, else one core left to the event loop."""
    return cores if cores <= 2 else cores - 1


def parse_threads(value: object) -> int | None:
    """`auto` (or None / "") -> None; a positive integer -> itself; anything else raises."""
    if value is None or value == "" or value == "auto":
        return None
    if isinstance(value, bool):
        raise ValueError(f"torch_threads must be 'auto' or a positive integer, got {value!r}")
    try:
        n = int(str(value))
    except ValueError:
        raise ValueError(
            f"torch_threads must be 'auto' or a positive integer, got {value!r}"
        ) from None
    if n < 1:
        raise ValueError(f"torch_threads must be 'auto' or a positive integer, got {value!r}")
    return n


def resolve_threads(explicit: int | None = None) -> int:
    """explicit, else MEMGATE_TORCH_THREADS, else the default for this process's cores."""
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"torch threads must be positive, got {explicit}")
        return explicit
    configured = parse_threads(os.environ.get(ENV))
    if configured is not None:
        return configured
    return default_threads(cores())


def prepare_process() -> None:
    """Before any torch work of a process that runs engines: one thread for every thread that
    does not say otherwise. Sets OMP_NUM_THREADS / MKL_NUM_THREADS when torch has not loaded
    yet (later they change nothing) and torch's default when it has."""
    if "torch" not in sys.modules:
        for name in RUNTIME_ENV:
            if os.environ.get(name) not in (None, "1"):
                log.info("%s=%s replaced by 1: server.torch_threads sizes the engine's threads",
                         name, os.environ[name])
            os.environ[name] = "1"
        return
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class Claim:
    """An engine's threads, granted by `claim`; give them back with `release`."""

    owner: str
    threads: int


def claim(explicit: int | None = None, owner: str | None = None) -> Claim:
    """An engine's threads: what it asks for (`resolve_threads`), capped so that the workers of
    every engine in this process stay within cores - 1. An `owner` that holds a claim already
    (a backend whose engine a reload replaces: the old one drains while the new one serves)
    gets the same threads again and takes no more of the budget; the overlap ends when the old
    engine's thread does."""
    global _anonymous
    wanted = resolve_threads(explicit)
    with _lock:
        if owner is None:
            _anonymous += 1
            owner = f"engine-{_anonymous}"
        held = _claims.get(owner)
        if held is not None:
            held[1] += 1
            return Claim(owner, held[0])
        granted = min(wanted, 1 + max(0, cores() - 1 - _workers()))
        _claims[owner] = [granted, 1]
    if granted < wanted:
        log.warning("engine threads for %s: %d asked, %d granted (more OpenMP workers than cores "
                    "make every barrier sleep)", owner, wanted, granted)
    return Claim(owner, granted)


def release(granted: Claim) -> None:
    """Give back a claim once the engine thread (and so its team) has ended."""
    with _lock:
        held = _claims.get(granted.owner)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _claims[granted.owner]


def _workers() -> int:
    return sum(threads - 1 for threads, _ in _claims.values())  # callers hold _lock


def workers_claimed() -> int:
    """OpenMP workers (threads - 1) that this process's engines hold."""
    with _lock:
        return _workers()


def enter_engine_thread(threads: int) -> int:
    """In the engine thread, before its first torch op: this thread's team of `threads`.
    Returns the threads torch now gives this thread."""
    import torch

    torch.set_num_threads(threads)  # this thread's OpenMP and MKL threads (and torch's default)
    return int(torch.get_num_threads())  # initializes this thread: a later default won't reset it


def restore_default() -> None:
    """In the thread that started an engine, once the engine thread has entered: torch's
    default for threads yet to start goes back to one (and this thread's too)."""
    import torch

    torch.set_num_threads(1)


def resize_engine_thread(threads: int) -> int:
    """In the engine thread, between steps: its team becomes `threads`. Returns what torch
    gives this thread. torch's default for new threads goes back to one before it returns."""
    n = enter_engine_thread(threads)
    if threads > 1:  # set_num_threads also made `threads` every new thread's default
        t = threading.Thread(target=restore_default, name="placement-default")
        t.start()
        t.join()
    return n


def decide(current: int, granted: int, cpus: int, others: float) -> int:
    """An engine team's size given the cores other processes used lately (`others`, in cores):
    as many as the cores they leave, rounded, within 1..granted. It shrinks as soon as they
    take half a core of its share and grows back only once a whole core is free again less a
    quarter, so a neighbour hovering at the edge does not flip it every window."""
    free = cpus - others
    if free < current - 0.5:
        return max(1, min(granted, int(free + 0.5)))
    if current < granted and free >= current + 0.75:
        return min(granted, int(free + 0.25))
    return current


class Contention:
    """How much of the cores this process may run on other processes use: /proc/stat's busy
    time (user, nice, system, irq, softirq, steal) on those cores less this process's own CPU
    time, per `interval` seconds. A team of two on two cores stalls at every barrier while a
    neighbour holds one of them (docs/performance.md "Engine speed": vLLM CPU's process, busy for a while
    after its own requests, took memgate's batch-1 speed from 330 to 70-90 tokens/s), so the
    engine thread polls this between steps and resizes its team (`decide`). Disabled (always
    None) where /proc is not there."""

    def __init__(
        self, interval: float = 0.5, read: Callable[[], tuple[str, str]] | None = None,
        clock: Callable[[], float] = time.monotonic, cpus: list[int] | None = None,
    ) -> None:
        self.interval = interval
        self.cpus = affinity() if cpus is None else cpus
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._read = read or read_proc_stat  # (/proc/stat, /proc/self/stat): tests inject them
        self._clock = clock
        self._last = self._sample()
        self.window = 0.0  # seconds the last value of `others` spans

    def restart(self) -> None:
        """Start the next window now (the engine was idle: what others did then is past)."""
        self._last = self._sample()

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            stat, own_text = self._read()
        except OSError:
            return None
        own = own_text.rsplit(")", 1)[1].split()
        wanted = {f"cpu{i}" for i in self.cpus}
        busy = 0
        for line in stat.splitlines():
            name, _, rest = line.partition(" ")
            if name in wanted:
                v = [int(x) for x in rest.split()]
                busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
        return self._clock(), busy, int(own[11]) + int(own[12])

    def others(self) -> float | None:
        """Cores other processes used since the last call that returned a value; None until
        `interval` has passed (or without /proc)."""
        if self._last is None:
            return None
        if self._clock() - self._last[0] < self.interval:
            return None
        now = self._sample()
        if now is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        if t1 <= t0:
            return None
        self._last = now
        self.window = t1 - t0
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / self.tick / (t1 - t0))


def read_proc_stat() -> tuple[str, str]:
    """The machine's and this process's CPU counters (/proc/stat, /proc/self/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        stat = f.read()
    with open("/proc/self/stat", encoding="ascii") as f:
        return stat, f.read()


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
