"""The fast writer: how `gateway serve` answers the generation routes on its own connections.

POST /v1/chat/completions and /v1/completions are answered by the connection's protocol
(gateway/http/protocol.py) through a FastCycle instead of the ASGI stack: no scope-to-Request
wrapping, no middleware send wrappers, no per-request disconnect-watcher task, and the
status line, headers and body leave in one socket write (Starlette writes the head and the
body separately: two syscalls per answer). What is answered is gateway/handler.py's, the
same as through the ASGI writer.

Everything uvicorn's cycle does for a connection stays as it is: keep-alive and its timer,
pipelined requests, flow control, `connection: close` at shutdown, the 100-continue answer.
The client going away cancels the request's task directly (connection_lost), which releases
what its generation holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr

from gateway import validation
from gateway.core.errors import ClientDisconnected
from gateway.http.contract import (
    CONTENT_TYPE,
    INTERNAL_ERROR,
    SSE_HEADERS,
    Handler,
    Incoming,
    Media,
    check_body_size,
    clean_headers,
    sse_frames,
)

log = logging.getLogger("gateway.http")

MEDIA = {media: f"content-type: {value}\r\n".encode() for media, value in CONTENT_TYPE.items()}
_LAST_CHUNK = b"0\r\n\r\n"


def header_lines(headers: dict[str, str]) -> bytes:
    """`name: value` lines of the answer's headers (clean_headers: the ASGI writer's too)."""
    return "".join(f"{n}: {v}\r\n" for n, v in clean_headers(headers)).encode("latin-1", "replace")


class FastCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, writing directly instead of through ASGI messages:
    a ResponseWriter (gateway/http/contract.py)."""

    def __init__(self, *args: Any, handler: Handler, request: Incoming,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler
        self.request = request
        self.task: asyncio.Task[None] | None = None
        self.gone = False  # the client went away while the request was being answered

    @property
    def started(self) -> bool:
        return self.response_started

    async def run_asgi(self, app: Any) -> None:
        """Called by uvicorn's protocol as for any request (`app` unused)."""
        self.task = asyncio.current_task()
        try:
            if not self.disconnected:
                await self.handler.handle(self.request, self)
        except asyncio.CancelledError:
            raise  # a server shutdown (the client's own ends in the handler)
        except BaseException as exc:  # a bug: the client still gets an answer (or a cut)
            log.error("Exception in the generation handler", exc_info=exc)
            await self.respond(500, Media.JSON, {}, INTERNAL_ERROR)
        finally:
            self.task = None
            self.on_response = lambda: None

    def lost(self) -> None:
        """The connection closed: cancel the request's work if its answer is not complete."""
        if self.task is not None and not self.response_complete and not self.gone:
            self.gone = True
            self.task.cancel()

    # ---- request --------------------------------------------------------------------------

    async def read_body(self, limit: int, timeout_s: float) -> bytearray:
        """The whole body (usually already here: it came with the head)."""
        if self.more_body:
            if self.waiting_for_100_continue and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.waiting_for_100_continue = False
            try:
                async with asyncio.timeout(timeout_s):  # a slow sender must not hold a task
                    while self.more_body and not self.disconnected:
                        check_body_size(len(self.body), limit)
                        self.flow.resume_reading()
                        await self.message_event.wait()
                        self.message_event.clear()
            except TimeoutError:
                raise validation.body_timeout(timeout_s) from None
            if self.disconnected:
                raise ClientDisconnected("The client closed the connection.")
        check_body_size(len(self.body), limit)
        return self.body

    # ---- response -------------------------------------------------------------------------

    def _head(self, status: int, media: Media, headers: dict[str, str], length: int | None) -> bytes:
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope),
                                    self.request.method, self.scope["path"],
                                    self.scope["http_version"], status)
        framing = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
        close = b"" if self.keep_alive else b"connection: close\r\n"
        return b"".join((STATUS_LINE[status], _defaults(self.default_headers), MEDIA[media],
                         header_lines(headers), framing, close, b"\r\n"))

    async def respond(self, status: int, media: Media, headers: dict[str, str], body: bytes) -> None:
        """A whole answer, in one write. After a stream began (an error past its head) there
        is no other answer to give: the connection closes, so the client sees it cut."""
        if self.disconnected or self.response_complete:
            return
        if self.response_started:
            self.transport.close()
            return
        self.transport.write(self._head(status, media, headers, len(body)) + body)
        self._complete()

    async def stream(self, headers: dict[str, str], events: AsyncGenerator[bytes, None]) -> None:
        """200 with chunked server-sent events; the head goes out with the first event."""
        pending = self._head(200, Media.SSE, {**SSE_HEADERS, **headers}, None)
        async with contextlib.aclosing(sse_frames(events)) as frames:
            async for event, last in frames:
                parts = [pending, b"%x\r\n" % len(event), event, b"\r\n"] if event else [pending]
                if last:
                    parts.append(_LAST_CHUNK)
                if not await self._write(b"".join(parts)):
                    return
                pending = b""
                if last:
                    self._complete()

    async def _write(self, data: bytes) -> bool:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return False
        self.transport.write(data)
        return True

    def _complete(self) -> None:
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


_defaults_cache: tuple[object, bytes] = (None, b"")


def _defaults(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default headers (server, date) as bytes; the list is replaced once a second."""
    global _defaults_cache
    if _defaults_cache[0] is not headers:
        _defaults_cache = (headers, b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers))
    return _defaults_cache[1]
