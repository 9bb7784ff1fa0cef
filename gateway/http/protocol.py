"""The HTTP protocol `gateway serve` runs: uvicorn's httptools protocol with

- a bound on the request head (MAX_HEADER_BYTES), counted on the raw bytes while the head is
  incomplete (httptools buffers a header value that never ends without limit): beyond it the
  answer is 431 and the connection closes (every refusal here closes after a short linger,
  so that the client reads the answer);
- a deadline for the request head (`server.header_timeout_s`, from its first byte): a head
  still incomplete then is answered 408 and the connection closes; a connection that sends no
  byte at all closes after the keep-alive timeout;
- duplicate Authorization, Content-Type or Content-Length headers refused with 400 (two
  Authorization headers would let the two halves of a stack pick different tenants);
- HTTP/1.1 only: any other version (HTTP/1.0, HTTP/2.0 on a text line, a request line without
  a version, which httptools reports as 0.9) is 400, except HTTP/1.0 GET/HEAD on /health,
  /ready and /metrics (load balancers' checks speak it); a Transfer-Encoding other than one
  final `chunked` is 501 (what httptools accepts as chunked but with other codings before it,
  and what it rejects itself: both close, as every refusal here);
- the request's headers are its head's and no more: httptools reports a chunked body's
  trailer fields through on_header too, and uvicorn would append them to the very list the
  scope (and the fast writer's Incoming) holds, after the duplicate check and before the
  request's task reads it; here trailers are counted against MAX_HEADER_BYTES and dropped;
- the generation routes (POST /v1/chat/completions, /v1/completions) answered through the
  fast writer (gateway/http/fast.py) instead of the ASGI stack. Everything else (other
  routes, a root_path, a query string, percent-escapes) goes to the ASGI app, whose own
  writer gives the generation routes the same handler (gateway/handler.py).

All of it holds for every route, whichever path answers it. The uvicorn internals this
relies on are listed in UVICORN_INTERNALS; uvicorn is pinned to the minor version tested, and
tests/gateway/http/test_protocol_internals.py fails if one of them goes away.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, NoReturn

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.core.errors import GatewayError, HeadersTooLarge, InvalidRequest, RequestTimeout
from gateway.core.worker import worker_id
from gateway.http.contract import GENERATION_ROUTES, Handler, Incoming
from gateway.http.fast import FastCycle

MAX_HEADER_BYTES = 64 * 1024  # request line + all headers
DEFAULT_HEADER_TIMEOUT_S = 10.0
LINGER_S = 2.0  # after a refusal, what the client still sends is dropped this long at most
LINGER_BYTES = 4 * 2**20  # ... and this much at most
SINGLETON_HEADERS = (b"authorization", b"content-type", b"content-length")
TRANSFER_ENCODING = b"transfer-encoding"
CHECKED_HEADERS = (*SINGLETON_HEADERS, TRANSFER_ENCODING)  # looked at in every head
# What may still come over HTTP/1.0 (load balancers' health checks); the rest is HTTP/1.1 only.
HTTP10_METHODS = (b"GET", b"HEAD")
HTTP10_PATHS = (b"/health", b"/ready", b"/metrics")

# The paths the fast writer answers, as the parser gives them.
FAST_ROUTES = {path.encode(): kind for path, kind in GENERATION_ROUTES.items()}

# What gateway/http/protocol.py and gateway/http/fast.py use of uvicorn beyond its public API:
# (where, name). The test named above checks each on a real protocol and cycle.
UVICORN_INTERNALS: tuple[tuple[str, str], ...] = tuple(
    ("protocol", n) for n in (
        "config", "app", "loop", "logger", "access_logger", "access_log", "parser", "url",
        "scope", "headers", "cycle", "transport", "flow", "server_state", "root_path",
        "limit_concurrency", "expect_100_continue", "pipeline", "timeout_keep_alive",
        "timeout_keep_alive_task", "timeout_keep_alive_handler", "data_received",
        "connection_made", "connection_lost", "on_message_begin", "on_url", "on_header",
        "on_headers_complete", "on_message_complete", "on_response_complete",
        "send_400_response", "_start_asgi_task", "_unset_keepalive_if_required")
) + tuple(
    ("cycle", n) for n in (
        "scope", "transport", "flow", "logger", "access_logger", "access_log",
        "default_headers", "message_event", "on_response", "disconnected", "keep_alive",
        "waiting_for_100_continue", "body", "more_body", "response_started",
        "response_complete", "run_asgi")
) + tuple(("flow", n) for n in ("write_paused", "drain", "pause_reading", "resume_reading")) + (
    ("server_state", "default_headers"), ("module", "STATUS_LINE"),
    ("module", "RequestResponseCycle"), ("utils", "get_client_addr"))


def _name_worker(config: Any, server_state: Any) -> None:
    """Every answer of this process names it (x-gateway-worker): uvicorn's default headers,
    which both the fast writer and uvicorn's own cycle send, carry it; uvicorn rebuilds the
    list from config.encoded_headers once a second, so it goes there too."""
    header = (b"x-gateway-worker", worker_id().encode())
    if header not in config.encoded_headers:
        config.encoded_headers = [*config.encoded_headers, header]
    if header not in server_state.default_headers:
        server_state.default_headers = [*server_state.default_headers, header]


def _refusal(exc: GatewayError) -> bytes:
    """A whole answer that closes the connection, in OpenAI's error shape."""
    body = orjson.dumps(exc.body())
    return b"".join((STATUS_LINE[exc.status], b"content-type: application/json\r\n",
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body))


_NOT_HTTP = _refusal(InvalidRequest("The request is not valid HTTP/1.1.", code="invalid_http"))
_NOT_HTTP11 = _refusal(InvalidRequest(
    "Only HTTP/1.1 is served (HTTP/1.0 only for GET and HEAD on /health, /ready and /metrics).",
    code="unsupported_http_version"))
_BAD_CODING = _refusal(InvalidRequest(
    "The only Transfer-Encoding supported is a single `chunked`.",
    code="unsupported_transfer_encoding", status=501))


def _parser_refusal() -> bytes:
    """The answer to the parse error being handled (send_400_response runs inside uvicorn's
    `except HttpParserError`): a Transfer-Encoding llhttp itself refuses (`chunked, gzip`,
    `chunked` twice, an empty one) is 501 like the ones it accepts but we do not; a
    Transfer-Encoding beside a Content-Length (a smuggling shape) and the rest stay 400."""
    reason = str(sys.exc_info()[1] or "")
    if "Transfer-Encoding" in reason and "Content-Length" not in reason:
        return _BAD_CODING
    return _NOT_HTTP


class GatewayHttpProtocol(HttpToolsProtocol):
    _head_bytes = 0  # request line + headers parsed so far
    # the app's generation handler, bound by `serving` when the app is built (gateway serve);
    # None (any other app, or the class named by its import string): all takes the ASGI path
    generation_handler: Handler | None = None
    _raw_head = 0  # raw bytes received while the head was incomplete
    _head_pending = True  # a request head is due (start, or after a message's end)
    _heads = 0  # request heads completed on this connection
    _head_timer: asyncio.TimerHandle | None = None
    _refuse: bytes | None = None  # the answer send_400_response gives instead of uvicorn's
    _lingering: asyncio.TimerHandle | None = None  # refused: closes the connection when due
    _lingered = 0  # bytes read and dropped since the refusal
    _last_request = False  # shutdown began before this connection's first request: serve it, close

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handler = self.generation_handler
        self.header_timeout_s = (handler.header_timeout_s if handler is not None
                                 else DEFAULT_HEADER_TIMEOUT_S)
        self.handler = handler if not self.root_path else None
        _name_worker(self.config, self.server_state)

    # ---- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # a connection that never sends a byte closes like an idle kept-alive one
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:  # refused: read and dropped until the close
            self._linger(data)
            return
        counting, heads = self._head_pending, self._heads
        if counting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)
        super().data_received(data)  # parser errors: send_400_response (ours below)
        if (counting and self._head_pending and heads == self._heads
                and not self.transport.is_closing()):
            # every byte of this read belongs to the head still incomplete (a read in which a
            # head completed is not counted: the next head's start in it is at most one read)
            self._raw_head += len(data)
            if self._raw_head > MAX_HEADER_BYTES:
                self._refuse = _refusal(_head_too_large())
                self.send_400_response("")

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._lingering is not None:
            self._lingering.cancel()
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, FastCycle):
            cycle.lost()

    def send_400_response(self, msg: str) -> None:
        """The answer to a request that cannot be parsed (uvicorn calls it) or that a check
        above refused, in OpenAI's error shape; then a lingering close: what the client still
        sends is read and dropped for up to LINGER_S (closing with unread bytes would reset
        the connection, and the client could lose the answer before reading it)."""
        self._stop_head_timer()
        if self.transport.is_closing() or self._lingering is not None:
            return
        self.transport.write(self._refuse or _parser_refusal())
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = self.loop.call_later(LINGER_S, self.transport.close)

    def _linger(self, data: bytes) -> None:
        self._lingered += len(data)
        if self._lingered > LINGER_BYTES and not self.transport.is_closing():
            self.transport.close()

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head_pending and not self.transport.is_closing():
            self._refuse = _refusal(RequestTimeout(
                f"The request head was not received within {self.header_timeout_s:g} s."))
            self.send_400_response("")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    # ---- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEADER_BYTES:  # stops the parser: send_400_response
            self._refuse = _refusal(_head_too_large())
            raise httptools.HttpParserError("request head too large")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))  # a trailer too: the head's bound covers both
        if self._head_pending:  # else a chunked body's trailer field: never a request header
            super().on_header(name, value)

    def _refuse_head(self, answer: bytes, why: str) -> NoReturn:
        """Stops the parser at the end of a head: send_400_response gives `answer`."""
        self._refuse = answer
        raise httptools.HttpParserError(why)

    def _check_version(self, http_version: str) -> None:
        """A head that is not HTTP/1.1 is refused, but for the health checks' HTTP/1.0."""
        if http_version == "1.0" and self.parser.get_method() in HTTP10_METHODS:
            try:
                path = httptools.parse_url(self.url).path
            except httptools.HttpParserError:
                path = b""
            if path in HTTP10_PATHS:
                return
        self._refuse_head(_NOT_HTTP11, f"HTTP/{http_version} refused")

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._heads += 1
        self._raw_head = 0
        self._stop_head_timer()
        parser = self.parser
        if parser.get_http_version() != "1.1":
            self._check_version(parser.get_http_version())
        seen: set[bytes] = set()
        for name, value in self.headers:
            if name in CHECKED_HEADERS:  # refusals stop the parser: send_400_response
                if name == TRANSFER_ENCODING:  # llhttp strips leading blanks, not a trailing tab
                    if name in seen or value.rstrip(b" ").lower() != b"chunked":
                        self._refuse_head(_BAD_CODING, "unsupported transfer-encoding")
                elif name in seen:
                    self._refuse_head(_refusal(InvalidRequest(
                        f"The request has more than one {name.decode()} header.",
                        code="duplicate_header")), "duplicate singleton header")
                seen.add(name)
        handler = self.handler
        kind = FAST_ROUTES.get(self.url) if handler is not None else None
        if (kind is None or handler is None or parser.get_method() != b"POST"
                or parser.should_upgrade() or self.limit_concurrency is not None):
            super().on_headers_complete()
            if self._last_request and self.cycle is not None:
                self.cycle.keep_alive = False
            return
        scope = self.scope  # HTTP/1.1 (checked above), as on_message_begin set it
        scope["method"] = "POST"
        path = scope["path"] = self.url.decode("ascii")
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
            keep_alive=parser.should_keep_alive() and not self._last_request,
            on_response=self.on_response_complete,
            handler=handler,
            request=Incoming(kind, "POST", path, self.headers),
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # pipelined: it starts when the answer before it is complete
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown closes a connection that has no request in progress. A
        connection accepted just before the listener closed has not sent its first request
        yet, but it is on its way (a worker being replaced while the others serve): answer that
        one request, then close, instead of dropping it (the header timeout still applies)."""
        if self._heads == 0 and self.cycle is None and not self.transport.is_closing():
            self._last_request = True
            return
        super().shutdown()

    def on_message_complete(self) -> None:
        self._head_pending = True  # the next bytes are the next request's head
        super().on_message_complete()


def _head_too_large() -> HeadersTooLarge:
    return HeadersTooLarge(f"The request head is larger than {MAX_HEADER_BYTES} bytes.")


def serving(handler: Handler) -> type[GatewayHttpProtocol]:
    """The protocol class for one app: its connections answer the generation routes with
    `handler` (which a config reload updates in place, head timeout included)."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"generation_handler": handler})
