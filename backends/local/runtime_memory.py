"""Process memory as the OS sees it: RSS, and RSS once freed heap is handed back."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

from gateway.core.procmem import status_bytes


def resident_bytes(pid: int | str = "self") -> int | None:
    """VmRSS of a process (this one by default), None where unknown."""
    return status_bytes(pid, "VmRSS")


def release_free_heap() -> None:
    """Collect garbage and return free malloc arenas to the OS (glibc; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def baseline_rss() -> int:
    """RSS of the runtime alone (interpreter, torch, libraries), 0 where unknown."""
    release_free_heap()
    return resident_bytes() or 0
