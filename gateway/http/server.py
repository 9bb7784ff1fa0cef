"""The uvicorn server `gateway serve` runs: SIGTERM starts the drain, and exits 0; with
`--workers N`, the supervisor that forwards SIGHUP (a config reload) to every worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
from types import FrameType

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

from gateway.shutdown import Drain

# The protocol `gateway serve` runs (an import string, so that `--workers N` processes load it
# too): bounded request heads and the generation routes' fast writer (gateway/http/).
HTTP_PROTOCOL = "gateway.http.protocol:GatewayHttpProtocol"

logger = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, telling the app's Drain when a shutdown signal arrives.

    uvicorn stops accepting at SIGTERM/SIGINT and waits `timeout_graceful_shutdown` for the
    requests in flight; the Drain ends in-flight streams cleanly just before that deadline.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()  # runs on the loop's thread (uvicorn installs it with signal.signal)
        super().handle_exit(sig, frame)

    def run_until_signalled(self) -> None:
        """Serve until a shutdown signal; return normally (exit 0) after the graceful stop.

        uvicorn re-raises the signal it caught once it has shut down, so that the previous
        handler runs; with SIG_DFL that would kill the process (exit -15) after a clean stop.
        """
        previous = signal.signal(signal.SIGTERM, _ignore)
        try:
            self.run()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _ignore(sig: int, frame: FrameType | None) -> None:
    return None


class ReloadingSupervisor(Multiprocess):
    """`gateway serve --workers N`: uvicorn's supervisor, except that SIGHUP reloads every
    worker's config in place (forwarded to each; gateway/reload.py) instead of replacing the
    workers, which would cut their streams. A worker still starting gets it once it is up (a
    SIGHUP then is remembered by the worker, never fatal: gateway.app.app_from_env)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self._hup_pending: set[int] = set()  # pids that get the SIGHUP once they are ready

    def handle_hup(self) -> None:
        logger.info("Received SIGHUP, reloading the config of every worker.")
        for process in self.processes:
            if process.pid is not None:
                self._hup_pending.add(process.pid)
        self._forward_hup()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        if self._hup_pending:
            self._forward_hup()

    def _forward_hup(self) -> None:
        live = {p.pid: p for p in self.processes if p.pid is not None}
        for pid in list(self._hup_pending):
            process = live.get(pid)
            if process is None or not process.process.is_alive():
                self._hup_pending.discard(pid)  # gone: its replacement reads the config anew
            elif process.is_ready(timeout=1):
                os.kill(pid, signal.SIGHUP)
                self._hup_pending.discard(pid)
