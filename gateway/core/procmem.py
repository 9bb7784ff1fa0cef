"""Process memory (RSS, PSS, swap, major faults) from /proc, and GPU memory through NVML."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """One process's memory as the kernel reports it; None where /proc does not say."""

    rss: int | None = None
    pss: int | None = None
    swap: int | None = None
    major_faults: int | None = None


@dataclass(frozen=True, slots=True)
class GpuMemory:
    device: str
    used: int
    total: int


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return out
    return out


def status_bytes(pid: int | str = "self", field: str = "VmRSS") -> int | None:
    """One size field of /proc/PID/status (VmRSS, VmHWM, VmSwap, ...) in bytes; None where
    /proc does not say."""
    return _kib_fields(f"/proc/{pid}/status", (field,)).get(field)


def _major_faults(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces): state is field 3, majflt field 12.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[9])
    except (IndexError, ValueError):
        return None


def read_process_memory(pid: str = "self") -> ProcessMemory:
    rollup = _kib_fields(f"/proc/{pid}/smaps_rollup", ("Rss", "Pss", "Swap"))
    status = _kib_fields(f"/proc/{pid}/status", ("VmRSS", "VmSwap"))
    return ProcessMemory(
        rss=status.get("VmRSS", rollup.get("Rss")),
        pss=rollup.get("Pss"),
        swap=rollup.get("Swap", status.get("VmSwap")),
        major_faults=_major_faults(pid),
    )


class GpuProbe:
    """NVML, initialised on first use. Without a driver or GPU it reports no devices (absent,
    not zero) and never tries again."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._failed = False

    def _init(self) -> Any:
        if self._nvml is None and not self._failed:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # pynvml.NVMLError and its LibraryNotFound, or no package
                self._failed = True
        return self._nvml

    @property
    def available(self) -> bool:
        return self._init() is not None

    def read(self) -> list[GpuMemory]:
        nvml = self._init()
        if nvml is None:
            return []
        try:
            out = []
            for i in range(nvml.nvmlDeviceGetCount()):
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i))
                out.append(GpuMemory(str(i), int(info.used), int(info.total)))
            return out
        except nvml.NVMLError:
            return []

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = None
