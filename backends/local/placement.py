"""Where the engine's CPU work runs, set once per process when an engine starts.

- torch intra-op threads. torch's pool is process-wide, so this is a server setting:
  `server.torch_threads` (`gateway serve` passes it on as MEMGATE_TORCH_THREADS, which worker
  processes inherit); `auto` or unset takes `default_threads(cores)`. The rule is measured
  (README "Engine speed"): the engine thread's torch work, the event loop (HTTP, tokenizing,
  streaming) and, on a development machine, the load generator share the cores; an intra-op
  thread preempted by any of them stalls every parallel region it belongs to. With up to 2
  cores torch gets 1 thread; beyond, all but one core, which is left to the event loop.
- glibc malloc. Step tensors above malloc's mmap threshold (128 KiB, raised as blocks are
  freed) came from fresh mappings every step and page-faulted on first touch; freed heap was
  trimmed back and faulted in again. Raising both thresholds keeps a step's workspace in the
  heap between steps: the memory a step needs stays resident (the ledger counts its peak as
  `workspace`), and larger allocations (the KV pool, weights) are still mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "MEMGATE_TORCH_THREADS"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for this parameter on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def default_threads(cores: int) -> int:
    """The measured default: one core for the event loop once there are more than two."""
    return 1 if cores <= 2 else cores - 1


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
    """explicit, else MEMGATE_TORCH_THREADS, else the default for this machine's cores."""
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"torch threads must be positive, got {explicit}")
        return explicit
    configured = parse_threads(os.environ.get(ENV))
    if configured is not None:
        return configured
    return default_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1)


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


def apply(explicit: int | None = None) -> int:
    """Set torch's intra-op threads (process-wide) and malloc's thresholds; returns threads."""
    threads = resolve_threads(explicit)
    torch.set_num_threads(threads)
    if not tune_malloc():
        log.info("glibc mallopt unavailable: malloc thresholds left as they are")
    return threads
