"""The HTTP client of the `openai` and `vllm` kinds: a keep-alive HTTP/1.1 pool over asyncio
protocols with httptools' response parser, raising httpx's exception classes.

Kept by measurement against aiohttp in the same gateway (docs/performance.md "Performance": `python -m
bench.overhead --client-compare`). What it does and nothing more: one base URL (http or https,
directly or through an http:// proxy, docs/security.md "Upstream HTTP"), requests with a bytes body,
responses framed by content-length, chunked encoding or the connection's end; connections
kept alive and reused most-recently-used first, at most `max_connections`, closed after
`keepalive_s` idle; a response not read to its end closes its connection.

What an upstream can send, and what it gets:
- interim 1xx responses (103 Early Hints, 100 Continue) are skipped: the request is answered
  by its own final response, never the next request by this one's;
- a byte after the final response's end (a second response in the same segment, a stray
  byte on an idle connection) closes the connection: it never reaches a later request;
- heads over MAX_HEAD_BYTES and bodies over `max_response_bytes` (after decoding) fail;
- gzip and deflate bodies are decoded (it asks for identity, an upstream may not listen);
- a kept-alive connection the upstream closed is found before the request is written
  (the socket is readable: end of file or bytes nobody asked for) and replaced.

Errors: httpx.ConnectError / ConnectTimeout (nothing was written: the caller may retry),
httpx.RemoteProtocolError (the request was written and the upstream closed or spoke
something else: never retried, RFC 9112 9.3.1), httpx.ReadTimeout (no byte for
`read_timeout` seconds), httpx.ReadError (closed or malformed mid-response, too large).
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools
import httpx
import orjson

from backends.upstream_proxy import Proxy
from gateway.core.media import is_json_media

PAUSE_BYTES = 256 * 1024  # a streamed body buffered this far ahead of its reader pauses the socket
DRAIN_S = 1.0  # how long a released response may take to end before its connection closes
MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
MAX_RESPONSE_BYTES = 64 * 2**20  # default bound of one body (decoded)


class UpstreamResponse(Protocol):
    """A response whose body is read as it arrives: `blocks()` as it comes, `aread()` all."""

    status_code: int
    content: bytes
    retry_after: str | None

    def blocks(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    def is_json(self) -> bool: ...

    def json(self) -> Any: ...

    def expect_end(self) -> None: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """What the `openai` kind needs of an HTTP client (one base URL)."""

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class _AfterEnd(Exception):
    """A second response began after this one's end: its bytes are nobody's."""


# ---- one connection -------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One upstream connection, one exchange at a time; httptools calls the on_* methods."""

    def __init__(self, pool: UpstreamHTTP) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.parser = httptools.HttpResponseParser(self)
        self.resp: _Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.paused = False
        self.forgotten = False  # its place in the pool was given back (UpstreamHTTP.forget)
        self.head_bytes = 0  # raw bytes of the response head being read

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp.done:  # bytes nobody asked for: the connection is not trusted
            self.close()
            return
        resp.got_bytes = True
        in_head = not resp.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            resp.fail(httpx.RemoteProtocolError("upstream switched protocols (101)"))
            self.close()
            return
        except httptools.HttpParserError as exc:  # a callback's own failure, or bad bytes
            cause = exc.__context__
            if not isinstance(cause, _AfterEnd | httpx.HTTPError):
                resp.fail(httpx.ReadError(f"malformed upstream response ({exc})"))
            self.close()
            return
        if in_head and not resp.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                resp.fail(httpx.ReadError(
                    f"upstream response head is larger than {MAX_HEAD_BYTES} bytes"))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None and not resp.done:
            if resp.head_done and not resp.framed:  # a body that ends with the connection
                resp.finish()
            elif not resp.got_bytes:
                resp.fail(httpx.RemoteProtocolError(
                    "upstream closed the connection without answering"))
            else:
                resp.fail(httpx.ReadError("upstream closed the connection mid-response"))
        self.pool.forget(self)

    # httptools callbacks (a raise stops the parser: data_received sees it)
    def on_message_begin(self) -> None:
        resp = self.resp
        assert resp is not None
        if resp.head_done:  # the final response ended; whatever follows is not this request's
            raise _AfterEnd
        resp.ctype = resp.encoding = ""  # a fresh head (after an interim response)
        resp.framed = False
        resp.retry_after = None

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        assert resp is not None
        name = name.lower()
        if name == b"content-type":
            resp.ctype = value.decode("latin-1")
        elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            resp.framed = True
        elif name == b"content-encoding":
            resp.encoding = value.decode("latin-1").strip().lower()
        elif name == b"retry-after":
            resp.retry_after = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        status = self.parser.get_status_code()
        self.head_bytes = 0
        if 100 <= status < 200:  # interim (101 is refused by data_received): the final one follows
            resp.interim = True
            return
        resp.status_code = status
        resp.keep_alive = self.parser.should_keep_alive()
        resp.head_done = True
        if resp.encoding not in ("", "identity"):
            try:
                resp.decoder = _decoder(resp.encoding)
            except ValueError as exc:
                resp.fail(httpx.DecodingError(str(exc)))
                raise
        resp.wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if resp.decoder is not None:
            body = resp.decode(body)
        resp.received += len(body)
        if resp.received > resp.limit:
            error = httpx.ReadError(f"upstream answer is larger than {resp.limit} bytes")
            resp.fail(error)
            raise error
        if resp.released or not body:  # the reader let go; the rest is dropped
            return
        resp.parts.append(body)
        resp.buffered += len(body)
        if resp.buffered > PAUSE_BYTES and resp.streaming and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp.wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        if resp.interim:
            resp.interim = False
            return
        if resp.decoder is not None and not resp.released:
            tail = resp.decoder.flush()
            if tail:
                resp.parts.append(tail)
        resp.finish()

    # the pool's side
    def readable(self) -> bool:
        """The idle socket has something to read: the upstream closed it (end of file) or sent
        bytes nobody asked for. Either way it must not carry a request."""
        if self.fd < 0:
            return False
        try:
            return bool(select.select((self.fd,), (), (), 0)[0])
        except (OSError, ValueError):
            return True

    def send(self, data: bytes, resp: _Response) -> None:
        self.resp = resp
        assert self.transport is not None
        self.transport.write(data)

    def drained(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


def _decoder(encoding: str) -> Any:
    """A zlib decompressor for the Content-Encoding, or ValueError for one not served."""
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped (the RFC's deflate)
    raise ValueError(f"upstream answered with content-encoding {encoding!r}, which is not supported")


# ---- one exchange ---------------------------------------------------------------------------


class _Response:
    """One exchange's answer, filled by its connection as bytes arrive."""

    __slots__ = ("_conn", "_loop", "_read_timeout", "_timer", "_waiter", "buffered", "content",
                 "ctype", "decoder", "done", "drain", "encoding", "error", "framed",
                 "got_bytes", "head_done", "interim", "keep_alive", "limit", "parts",
                 "received", "released", "retry_after", "status_code", "streaming")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, read_timeout: float,
                 limit: int) -> None:
        self._conn = conn
        self._loop = loop
        self._read_timeout = read_timeout
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.limit = limit
        self.status_code = 0
        self.ctype = ""
        self.encoding = ""
        self.retry_after: str | None = None
        self.decoder: Any = None
        self.parts: collections.deque[bytes] = collections.deque()
        self.buffered = 0  # bytes waiting for the reader
        self.received = 0  # body bytes so far (decoded)
        self.content = b""
        self.head_done = False
        self.interim = False  # a 1xx response is being read
        self.framed = False
        self.keep_alive = False
        self.got_bytes = False
        self.done = False
        self.released = False
        self.drain = False
        self.streaming = False  # read by blocks(): the socket pauses when the reader lags
        self.error: BaseException | None = None

    # connection side
    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def decode(self, data: bytes) -> bytes:
        try:
            out: bytes = self.decoder.decompress(data, self.limit - self.received + 1)
        except zlib.error:
            error: httpx.HTTPError = httpx.DecodingError(f"upstream sent a corrupt {self.encoding} body")
            self.fail(error)
            raise error from None
        if self.decoder.unconsumed_tail:  # more than the limit already
            error = httpx.ReadError(f"upstream answer is larger than {self.limit} bytes")
            self.fail(error)
            raise error
        return out

    def finish(self) -> None:
        self.done = True
        if self.released:  # drained after its reader let go: back to the pool
            self._settle()
        else:
            self.wake()

    def fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self.error = exc
        self.done = True
        if self.released:
            self._settle()
        else:
            self.wake()

    # reader side
    async def _wait(self) -> None:
        """Until the connection has news (the head, bytes, the end); ReadTimeout if none
        comes within the read timeout."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def head(self) -> None:
        while not self.head_done and not self.done:
            await self._wait()
        if self.error is not None:
            raise self.error
        if not self.head_done:
            raise httpx.RemoteProtocolError("upstream answered nothing")

    def _take(self) -> bytes:
        parts = self.parts
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        parts.clear()
        self.buffered = 0
        self._conn.drained()
        return data

    async def blocks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever bytes are there at each read."""
        self.streaming = True
        while True:
            if self.parts:
                yield self._take()
            elif self.done:
                if self.error is not None:
                    raise self.error
                return
            else:
                await self._wait()

    async def aread(self) -> bytes:
        """The whole body (never paused: it is bounded by the response limit instead)."""
        got: list[bytes] = []
        while True:
            if self.parts:
                got.append(self._take())
            if self.done:
                break
            await self._wait()
        if self.error is not None:
            raise self.error
        self.content = b"".join(got)
        return self.content

    def is_json(self) -> bool:
        """The body is one JSON document; anything else, a missing type included, is read as
        server-sent events."""
        return is_json_media(self.ctype)

    def json(self) -> Any:
        """The body read by aread(), parsed (ValueError if it is not JSON)."""
        return orjson.loads(self.content)

    async def aclose(self) -> None:
        self.release()

    def expect_end(self) -> None:
        """The reader saw the last event: at release, a body end still on its way (the
        terminating chunk in a later segment) is awaited briefly to keep the connection."""
        self.drain = True

    def release(self) -> None:
        """Back to the pool if read to its end on a keep-alive connection, else closed (a
        reader that stops early, a client gone, closes: the upstream stops generating)."""
        if self.released:
            return
        self.released = True
        self.parts.clear()
        if self.drain and not self.done and self.keep_alive and not self._conn.closed:
            self._timer = self._loop.call_later(DRAIN_S, self._settle, True)
            return
        self._settle()

    def _settle(self, give_up: bool = False) -> None:
        conn = self._conn
        if conn.resp is self:
            conn.resp = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not give_up and self.done and self.error is None and self.keep_alive and not conn.closed:
            conn.pool.put_back(conn)
        else:
            conn.close()
            conn.pool.forget(conn)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("upstream read timed out"))


# ---- the pool -------------------------------------------------------------------------------


class UpstreamHTTP:
    """One keep-alive pool to one base URL; used inside the running loop."""

    def __init__(self, base_url: str, headers: Mapping[str, str], connect_timeout: float,
                 read_timeout: float, max_connections: int, keepalive_s: float = 30.0,
                 proxy: Proxy | None = None, max_response_bytes: int = MAX_RESPONSE_BYTES,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream URL {base_url!r} is not an http(s) URL")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        self.proxy = proxy
        default_port = (url.scheme == "https" and self.port == 443) or (url.scheme == "http" and self.port == 80)
        host_header = url.netloc.rpartition("@")[2] if not default_port else self.host
        # Through a proxy, plain http requests name the whole URL (absolute form); https goes
        # through a CONNECT tunnel and looks direct inside it.
        forward = proxy is not None and self.ssl is None
        self.prefix = f"{url.scheme}://{host_header}{url.path}" if forward else url.path
        fixed = {"host": host_header, "accept-encoding": "identity",
                 **{k.lower(): v for k, v in headers.items()}}
        if forward and proxy is not None and proxy.authorization:
            fixed["proxy-authorization"] = proxy.authorization
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.max_response_bytes = max_response_bytes
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lines: dict[tuple[str, str], bytes] = {}
        self._closed = False

    # ---- connections --------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        """A connection kept alive and still sound, or a new one."""
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.keepalive_s or conn.readable():
                conn.close()
                self.forget(conn)
                continue
            return conn
        while self._open >= self.max_connections:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                raise
            if idle:
                return await self._acquire()
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (self.host, self.port)
        tunnel = proxy is not None and self.ssl is not None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if tunnel:
                    assert proxy is not None
                    return await _tunnel(loop, self, proxy)
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), host, port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS with {self.host}:{self.port} failed ({exc.reason})") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from None
        return conn

    def put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            self.forget(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        """A connection closed: its place in the pool is free."""
        if conn.forgotten:
            return
        conn.forgotten = True
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ---- requests -----------------------------------------------------------------------

    def _request_line(self, method: str, path: str) -> bytes:
        line = self._lines.get((method, path))
        if line is None:
            line = self._lines[(method, path)] = (
                f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode() + self._fixed)
        return line

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> _Response:
        """Send; return once the final status line and headers are in (the body streams
        after). Once written, a request is never sent again (see the module's errors)."""
        if self._closed:
            raise httpx.ConnectError("the upstream client is closed")
        parts = [self._request_line(method, path)]
        if headers:
            for name, value in headers.items():
                parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            parts.append(b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
            parts.append(body)
        else:
            parts.append(b"\r\n")
        data = b"".join(parts)
        conn = await self._acquire()
        resp = _Response(conn, asyncio.get_running_loop(),
                         self.read_timeout if timeout is None else timeout, self.max_response_bytes)
        conn.send(data, resp)
        try:
            await resp.head()
        except BaseException:
            resp.release()
            raise
        return resp

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("the upstream client is closed"))
        self._waiters.clear()


# ---- https through a proxy ------------------------------------------------------------------


class _TunnelHead(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT (its head only; nothing follows it before TLS)."""

    def __init__(self) -> None:
        self.buf = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if not self.done.done() and (end >= 0 or len(self.buf) > MAX_HEAD_BYTES):
            self.done.set_result(self.buf[:end] if end >= 0 else b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(b"")


async def _tunnel(loop: asyncio.AbstractEventLoop, pool: UpstreamHTTP, proxy: Proxy) -> _Connection:
    """A TLS connection to the upstream inside a CONNECT tunnel through `proxy`."""
    transport, head = await loop.create_connection(_TunnelHead, proxy.host, proxy.port)
    try:
        target = f"{pool.host}:{pool.port}"
        auth = f"proxy-authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
        transport.write(f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n{auth}\r\n".encode("latin-1"))
        answer = await head.done
        line = answer.partition(b"\r\n")[0]
        parts = line.split(b" ", 2)
        if not line.startswith(b"HTTP/1.") or len(parts) < 2 or parts[1] != b"200":
            said = line.decode("latin-1", "replace")[:100] or "no answer"
            raise httpx.ConnectError(f"proxy {proxy!r} refused the tunnel to {target} ({said})")
        conn = _Connection(pool)
        assert pool.ssl is not None
        tls = await loop.start_tls(transport, conn, pool.ssl, server_hostname=pool.host)
        if tls is None:
            raise httpx.ConnectError(f"TLS through proxy {proxy!r} failed")
        conn.connection_made(tls)
        return conn
    except BaseException:
        transport.close()
        raise
