"""Process memory as the OS or the GPU driver sees it: RSS (and RSS once freed heap is handed
back) on the CPU, the process's device memory on CUDA."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os

import torch

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


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def cuda_process_bytes(device: torch.device) -> int | None:
    """GPU memory this process holds on `device` as the driver counts it (NVML: CUDA context,
    allocator pools, kernels), None where NVML or this process's entry is not visible (no
    driver, no pynvml, or a container whose PIDs NVML does not see)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError (no driver / GPU) or no package
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None
    except pynvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def device_bytes(device: torch.device) -> int | None:
    """What this process holds where the engine's tensors live: RSS on the CPU; on CUDA the
    driver's count for this process, else the caching allocator's reserved bytes."""
    if device.type != "cuda":
        return resident_bytes()
    measured = cuda_process_bytes(device)
    return measured if measured is not None else int(torch.cuda.memory_reserved(device))


def device_baseline(device: torch.device) -> int:
    """device_bytes once freed host heap is handed back (CPU) or the GPU is idle (CUDA)."""
    if device.type != "cuda":
        return baseline_rss()
    torch.cuda.synchronize(device)
    return device_bytes(device) or 0
