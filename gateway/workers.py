"""`gateway serve --workers N`: N worker processes on one listening socket, each a whole
gateway (its own app, engine and drain), under a small supervisor in the parent.

- SIGTERM / SIGINT to the parent: every worker gets SIGTERM and drains as a single process
  does (gateway/shutdown.py: streams still running end with the `shutting_down` event just
  before server.shutdown_grace_s); the parent exits 0 when they have.
- A worker that dies is replaced.
- Recycling (`server.recycle_other_bytes`): a worker whose unexplained memory (`other` of
  its backends' snapshots: measured minus every attributed component) passes the threshold
  asks to be replaced; the parent starts a replacement, waits until it serves, then sends
  the old one SIGTERM, so it stops accepting and finishes what it holds: no request lost.
  One worker is replaced at a time.
- SIGHUP to the parent: forwarded to every worker, each reloads its config in place
  (gateway/reload.py; a worker still starting gets it once it serves).

Each answer names its worker (`x-gateway-worker`, gateway/http/protocol.py), and so does
/debug/memory.
"""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

import uvicorn

from gateway.core.worker import worker_id

log = logging.getLogger("gateway.workers")

READY_TIMEOUT_S = 180.0  # a replacement that does not serve by then is given up
CHECK_EVERY_TICKS = 10  # uvicorn ticks every 0.1 s: the memory check once a second


# ---------------------------------------------------------------- the worker process


def _worker_main(config_path: str, server_kwargs: dict[str, Any], sock: socket.socket,
                 ready: Event, recycle: Event) -> None:
    from gateway.app import create_app
    from gateway.http.server import DrainingServer, app_config
    from gateway.reload import arm_sighup
    from gateway.settings import load_settings

    arm_sighup()  # a SIGHUP while the backends load is a reload once started, not an exit

    log_config = server_kwargs.get("log_config")
    if isinstance(log_config, dict):  # the parent's (server.log_format: text or json)
        logging.config.dictConfig(log_config)
    else:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(config_path)
    app = create_app(settings)
    state = app.state.gateway
    limit = settings.server.recycle_other_bytes

    class WorkerServer(DrainingServer):
        async def on_tick(self, counter: int) -> bool:
            if self.started and not ready.is_set():
                ready.set()
            if (limit is not None and self.started and not recycle.is_set()
                    and counter % CHECK_EVERY_TICKS == 0):
                other = unexplained_bytes(state.backends.values())
                if other is not None and other > limit:
                    log.warning("worker %s: unexplained memory %d B > recycle_other_bytes %d B; "
                                "asking to be replaced", worker_id(), other, limit)
                    recycle.set()
            return await super().on_tick(counter)

    server = WorkerServer(app_config(app, **server_kwargs), state.drain)
    server.run_until_signalled([sock])


def unexplained_bytes(backends: Any) -> int | None:
    """The largest `other` among the backends' memory snapshots (None: nothing measured)."""
    others = [o for b in backends if (o := b.memory().other) is not None]
    return max(others) if others else None


# ---------------------------------------------------------------- the parent


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    ready: Event
    recycle: Event


class Supervisor:
    def __init__(self, config_path: str, workers: int, server_kwargs: dict[str, Any]) -> None:
        self.config_path = config_path
        self.count = workers
        self.kwargs = dict(server_kwargs)
        self.host, self.port = self.kwargs.pop("host"), self.kwargs.pop("port")
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None
        self._hup_pending: set[int] = set()  # workers that get a SIGHUP once they serve

    def _spawn(self) -> _Worker:
        assert self.sock is not None
        ready, recycle = self.ctx.Event(), self.ctx.Event()
        proc = self.ctx.Process(target=_worker_main, name="gateway-worker", args=(
            self.config_path, self.kwargs, self.sock, ready, recycle))
        proc.start()
        return _Worker(proc, ready, recycle)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _hup(self, sig: int, frame: FrameType | None) -> None:
        log.info("SIGHUP: reloading the config of every worker")
        self._hup_pending.update(w.process.pid for w in self.workers if w.process.pid is not None)

    def _forward_hup(self) -> None:
        live = {w.process.pid: w for w in self.workers}
        for pid in list(self._hup_pending):
            w = live.get(pid)
            if w is None or not w.process.is_alive():
                self._hup_pending.discard(pid)  # gone: its replacement reads the config anew
            elif w.ready.is_set():
                os.kill(pid, signal.SIGHUP)
                self._hup_pending.discard(pid)

    def run(self) -> int:
        multiprocessing.allow_connection_pickling()
        config = uvicorn.Config("gateway.app:app_from_env", host=self.host, port=self.port,
                                log_config=self.kwargs.get("log_config"))  # the gateway's format
        self.sock = config.bind_socket()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._hup)
        self.workers = [self._spawn() for _ in range(self.count)]
        log.info("supervisor %d: %d workers on %s:%s", os.getpid(), self.count, self.host, self.port)
        while not self.stopping.wait(0.25):
            self._keep_alive()
            self._forward_hup()
            self._recycle_one()
        for w in self.workers:
            _terminate(w)
        grace = float(self.kwargs.get("timeout_graceful_shutdown", 10)) + 10
        deadline = time.monotonic() + grace
        for w in self.workers:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
        self.sock.close()
        return 0

    def _keep_alive(self) -> None:
        for i, w in enumerate(self.workers):
            if not w.process.is_alive() and not self.stopping.is_set():
                log.warning("worker %s exited (%s); starting another", w.process.pid,
                            w.process.exitcode)
                self.workers[i] = self._spawn()

    def _recycle_one(self) -> None:
        """Replace the first worker that asked: its replacement serves before it stops."""
        for i, old in enumerate(self.workers):
            if not old.recycle.is_set() or not old.process.is_alive():
                continue
            new = self._spawn()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not new.ready.wait(0.25):
                if self.stopping.is_set() or not new.process.is_alive() or time.monotonic() > deadline:
                    log.error("replacement for worker %s did not start; keeping it", old.process.pid)
                    _terminate(new)
                    new.process.join(30)
                    old.recycle.clear()
                    return
            self.workers[i] = new
            log.warning("worker %s replaced by %s (recycle_other_bytes)", old.process.pid,
                        new.process.pid)
            _terminate(old)  # it drains; joined by the thread so the supervisor goes on
            threading.Thread(target=old.process.join, daemon=True).start()
            return


def _terminate(w: _Worker) -> None:
    if w.process.is_alive() and w.process.pid is not None:
        os.kill(w.process.pid, signal.SIGTERM)
