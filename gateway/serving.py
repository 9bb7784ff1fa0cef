"""The uvicorn server `gateway serve` runs: SIGTERM starts the drain, and exits 0."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import uvicorn

from gateway.shutdown import Drain

MAX_HEADER_BYTES = 64 * 1024  # request line + all headers; beyond: 400 and the connection closes


def http_protocol() -> type[Any]:
    """uvicorn's httptools protocol with a bound on the request head (httptools has none, so a
    client could make the gateway buffer megabytes of headers); h11 where httptools is missing
    (h11 bounds the head itself, at 16 KiB)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            super().on_message_begin()

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > MAX_HEADER_BYTES:  # the parser turns this into a 400
                raise httptools.HttpParserError("request head too large")

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

    return BoundedHttpToolsProtocol


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
