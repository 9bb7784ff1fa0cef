"""The HTTP protocol `gateway serve` runs: uvicorn's httptools protocol with

- a bound on the request head: httptools has none, so a client could make the gateway buffer
  megabytes of headers; beyond MAX_HEADER_BYTES the answer is 400 and the connection closes;
- the generation routes (POST /v1/chat/completions, /v1/completions) answered on
  gateway/fastpath.py's path instead of through the ASGI stack. Everything else (other
  routes, a root_path, a query string, percent-escapes) goes to the ASGI app as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.fastpath import ROUTES, FastCycle, GenerationHandler

MAX_HEADER_BYTES = 64 * 1024  # request line + all headers


def _handler(config: Any, app: Any) -> GenerationHandler | None:
    """The app's GenerationHandler, found once per config: the GatewayState of the Starlette
    app under uvicorn's wrappers (None for any other app: everything takes the ASGI path)."""
    if not hasattr(config, "_gateway_handler"):
        handler = None
        for _ in range(8):
            state = getattr(getattr(app, "state", None), "gateway", None)
            if state is not None:
                handler = GenerationHandler(state)
                break
            app = getattr(app, "app", None)
        config._gateway_handler = handler
    found: GenerationHandler | None = config._gateway_handler
    return found


class GatewayHttpProtocol(HttpToolsProtocol):
    _head_bytes = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = _handler(self.config, self.app) if not self.root_path else None

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

    def on_headers_complete(self) -> None:
        handler = self.handler
        kind = ROUTES.get(self.url) if handler is not None else None
        parser = self.parser
        if (kind is None or handler is None or parser.get_method() != b"POST"
                or parser.should_upgrade() or self.limit_concurrency is not None):
            super().on_headers_complete()
            return
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = "POST"
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["path"] = self.url.decode("ascii")
        scope["raw_path"] = self.url
        scope["query_string"] = b""
        existing = self.cycle
        self.cycle = FastCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
            handler=handler,
            kind=kind,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # pipelined: it starts when the answer before it is complete
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, FastCycle):
            cycle.lost()
