"""The generation routes' own HTTP path under `gateway serve`.

POST /v1/chat/completions and /v1/completions are answered by the connection's protocol
(gateway/serving.py) through a FastCycle instead of the ASGI stack: no scope-to-Request
wrapping, no middleware send wrappers, no per-request disconnect-watcher task, and the
status line, headers and body leave in one socket write (Starlette writes the head and the
body separately: two syscalls per answer). The steps are those of the ASGI route
(gateway/routes.py `_generate`, kept for any ASGI server and for in-process tests): the same
authentication, body checks, validation, pipeline, telemetry record and answers; the tests
drive a real `gateway serve`, so they run this path.

Everything uvicorn's cycle does for a connection stays as it is: keep-alive and its timer,
pipelined requests, flow control, `connection: close` at shutdown, the 100-continue answer.
The client going away cancels the request's task directly (connection_lost), which releases
what its generation holds, as the watcher task did on the ASGI path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr

from gateway import routes
from gateway.core import context
from gateway.core.errors import ClientDisconnected, GatewayError
from gateway.sse import DONE, collect, stream_events

log = logging.getLogger("gateway.fastpath")

ROUTES = {b"/v1/chat/completions": "chat", b"/v1/completions": "completion"}
_JSON = b"content-type: application/json\r\n"
_SSE = (b"content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
        b"x-accel-buffering: no\r\n")
_LAST_CHUNK = b"0\r\n\r\n"
_INTERNAL_ERROR = orjson.dumps(GatewayError("The gateway failed to handle this request.").body())


def header_lines(headers: dict[str, str]) -> bytes:
    """`name: value` lines; a value with a control character (never expected: every value
    comes from config or from numbers) is left out rather than split the head."""
    out = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\x00" in value:
            log.warning("dropping response header %s with a control character", name)
            continue
        out.append(f"{name}: {value}\r\n")
    return "".join(out).encode("latin-1", "replace")


class FastCycle(RequestResponseCycle):
    """uvicorn's request/response cycle with direct writes instead of ASGI messages."""

    def __init__(self, *args: Any, handler: GenerationHandler, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler
        self.kind = kind
        self.task: asyncio.Task[None] | None = None
        self.gone = False  # the client went away while the request was being answered

    async def run_asgi(self, app: Any) -> None:
        """Called by uvicorn's protocol as for any request (`app` unused)."""
        self.task = asyncio.current_task()
        try:
            if not self.disconnected:
                await self.handler.handle(self)
        except asyncio.CancelledError:
            if not (self.gone and self.task is not None and self.task.uncancel() == 0):
                raise  # a server shutdown, not the client
        except BaseException as exc:  # a bug: the client still gets an answer (or a cut)
            log.error("Exception in the generation handler", exc_info=exc)
            self.respond(500, _JSON, _INTERNAL_ERROR)
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
        """The whole body (usually already here: it came with the head), within `limit`
        bytes (413) and `timeout_s` seconds (408)."""
        if self.more_body:
            if self.waiting_for_100_continue and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.waiting_for_100_continue = False
            try:
                async with asyncio.timeout(timeout_s):  # a slow sender must not hold a task
                    while self.more_body and not self.disconnected:
                        if len(self.body) > limit:
                            raise routes.too_large(limit)
                        self.flow.resume_reading()
                        await self.message_event.wait()
                        self.message_event.clear()
            except TimeoutError:
                raise routes.body_timeout(timeout_s) from None
            if self.disconnected:
                raise ClientDisconnected("The client closed the connection.")
        if len(self.body) > limit:
            raise routes.too_large(limit)
        return self.body

    # ---- response -------------------------------------------------------------------------

    def _head(self, status: int, headers: bytes, length: int | None) -> bytes:
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.access_log:
            self.access_logger.info('%s - "POST %s HTTP/%s" %d', get_client_addr(self.scope),
                                    self.scope["path"], self.scope["http_version"], status)
        framing = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
        close = b"" if self.keep_alive else b"connection: close\r\n"
        return b"".join((STATUS_LINE[status], _defaults(self.default_headers), headers, framing,
                         close, b"\r\n"))

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A whole answer, in one write. After a stream began (an error past its head) there
        is no other answer to give: the connection closes, so the client sees it cut."""
        if self.disconnected or self.response_complete:
            return
        if self.response_started:
            self.transport.close()
            return
        self.transport.write(self._head(status, headers, len(body)) + body)
        self._complete()

    async def stream(self, headers: bytes, events: AsyncIterator[bytes]) -> None:
        """200 with chunked server-sent events; the head goes out with the first event."""
        pending = self._head(200, headers, None)
        try:
            async for event in events:
                last = event.endswith(DONE)
                data = b"".join((pending, b"%x\r\n" % len(event), event, b"\r\n",
                                 _LAST_CHUNK if last else b""))
                pending = b""
                if not await self._write(data):
                    return
                if last:
                    self._complete()
                    return
            if await self._write(pending + _LAST_CHUNK):  # ended without [DONE] (an error event)
                self._complete()
        finally:
            await events.aclose()  # type: ignore[attr-defined]

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


class GenerationHandler:
    """One app's generation routes on the fast path (its GatewayState)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    async def handle(self, ex: FastCycle) -> None:
        authorization = ctype = length = request_id = None
        trace_headers: dict[str, str] = {}
        for name, value in ex.scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                ctype = value.decode("latin-1")
            elif name == b"content-length":
                length = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value
            elif name == b"traceparent" or name == b"tracestate":
                trace_headers[name.decode()] = value.decode("latin-1")
        rid = context.request_id(request_id)
        id_line = b"x-request-id: " + rid.encode() + b"\r\n"
        telemetry = self.state.telemetry
        rec = telemetry.open(ex.kind, "POST", ex.scope["path"], trace_headers)
        try:
            try:
                await self._answer(ex, authorization, ctype, length, rid, id_line, rec)
            except GatewayError as exc:
                rec.status = exc.status
                ex.respond(exc.status, _JSON + header_lines(exc.response_headers()) + id_line,
                           orjson.dumps(exc.body()))
            except asyncio.CancelledError:
                if ex.gone and not ex.response_started:
                    rec.status = ClientDisconnected.status
                raise
            except Exception:
                log.exception("unhandled error on POST %s", ex.scope["path"])
                rec.status = 500
                ex.respond(500, _JSON + id_line, _INTERNAL_ERROR)
        finally:
            telemetry.close(rec)

    async def _answer(self, ex: FastCycle, authorization: str | None, ctype: str | None,
                      length: str | None, rid: str, id_line: bytes, rec: Any) -> None:
        state = self.state
        server = state.settings.server
        tenant = state.tenants.authenticate(authorization)
        routes.check_body_headers(ctype, length, server.max_body_bytes)
        body = routes.parse_body(await ex.read_body(server.max_body_bytes, server.body_timeout_s))
        ctx, pipeline = routes.begin_generation(state, ex.kind, tenant, body, rid)
        chunks = pipeline.run(ctx)
        drain = state.drain
        if not ctx.stream:
            try:
                payload = orjson.dumps(await collect(ctx, chunks, drain))
                rec.status = 200
                ex.respond(200, _JSON + header_lines(pipeline.headers(ctx)) + id_line, payload)
            finally:  # after the answer: the backend's and the policies' releases
                await chunks.aclose()  # type: ignore[attr-defined]
            return
        # The first chunk first: a failure before it still gets its own status code.
        first = await routes.first_chunk(chunks, drain)
        rec.status = 200
        await ex.stream(_SSE + header_lines(pipeline.headers(ctx)) + id_line,
                        stream_events(ctx, chunks, first, drain))
