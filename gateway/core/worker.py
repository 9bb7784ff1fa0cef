"""Which gateway process this is, and how many this pod runs (`gateway serve --workers N`)."""

from __future__ import annotations

import os
import socket

WORKERS_ENV = "GATEWAY_WORKERS"  # set by the CLI before the workers start

_named: dict[int, str] = {}  # pid -> id (a forked child computes its own)


def worker_id() -> str:
    """This process, as answers name it (`x-gateway-worker`) and /debug/memory shows it."""
    pid = os.getpid()
    name = _named.get(pid)
    if name is None:
        name = _named[pid] = f"{socket.gethostname()}:{pid}"
    return name


def local_workers() -> int:
    """Gateway processes on this pod (the CLI's --workers), 1 when not set."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1
