"""The uvicorn server `gateway serve` runs: SIGTERM starts the drain, and exits 0 (with
`--workers N` each worker runs one, under gateway/workers.py's supervisor)."""

from __future__ import annotations

import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

from gateway.http.protocol import serving
from gateway.shutdown import Drain

# The protocol `gateway serve` runs (an import string, so that `--workers N` processes load it
# too): bounded request heads and the generation routes' fast writer (gateway/http/).
HTTP_PROTOCOL = "gateway.http.protocol:GatewayHttpProtocol"

logger = logging.getLogger("uvicorn.error")


def app_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for the gateway's app: its connections are handed the app's generation
    handler (the protocol class `serving` binds), so the fast writer needs no search for it."""
    return uvicorn.Config(app, **{**kwargs, "http": serving(app.state.generation_handler)})


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

    def run_until_signalled(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until a shutdown signal; return normally (exit 0) after the graceful stop.
        `sockets`: listen on these (a `--workers N` worker's share of the parent's socket).

        uvicorn re-raises the signal it caught once it has shut down, so that the previous
        handler runs; with SIG_DFL that would kill the process (exit -15) after a clean stop.
        """
        previous = signal.signal(signal.SIGTERM, _ignore)
        try:
            self.run(sockets)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _ignore(sig: int, frame: FrameType | None) -> None:
    return None
