"""The HTTP client of the `openai` backend kind: a keep-alive HTTP/1.1 pool over asyncio
protocols with httptools' response parser, raising httpx's exception classes.

Chosen by measurement (bench/overhead/clients.py, README "Performance"): the same streamed
chat completion from one core reaches 4-5x aiohttp's requests/s, and aiohttp several times
httpx's own pool's.
What it does and nothing more: one base URL (http or https), requests with a bytes body,
responses framed by content-length, chunked encoding or the connection's end; connections
kept alive and reused most-recently-used first, at most `max_connections`, closed after
`keepalive_s` idle; a response not read to its end closes its connection.

Errors: httpx.ConnectError (refused, or a kept-alive connection the upstream closed before
answering anything: nothing was answered, so the caller may retry), httpx.ConnectTimeout,
httpx.ReadTimeout (no byte for `read_timeout` seconds), httpx.ReadError (closed or
malformed mid-response). Callers keep one well-known tree for retries and rotation.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools
import httpx
import orjson

from gateway.validation import is_json_media

PAUSE_BYTES = 256 * 1024  # a body buffered this far ahead of its reader pauses the socket
DRAIN_S = 1.0  # how long a released response may take to end before its connection closes


class UpstreamResponse(Protocol):
    """A response whose body is read as it arrives: `blocks()` as it comes, `aread()` all."""

    status_code: int
    content: bytes

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


# ---- the pool ------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One upstream connection, one exchange at a time; httptools calls the on_* methods."""

    def __init__(self, pool: UpstreamHTTP) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: _Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.paused = False
        self.forgotten = False  # its place in the pool was given back (UpstreamHTTP.forget)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        resp.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp.fail(httpx.ReadError(f"malformed upstream response ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None and not resp.done:
            if resp.head_done and not resp.framed:  # a body that ends with the connection
                resp.finish()
            elif not resp.got_bytes:
                resp.fail(httpx.ConnectError("upstream closed the connection before answering"))
            else:
                resp.fail(httpx.ReadError("upstream closed the connection mid-response"))
        self.pool.forget(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        assert resp is not None
        name = name.lower()
        if name == b"content-type":
            resp.ctype = value.decode("latin-1")
        elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            resp.framed = True

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status_code = self.parser.get_status_code()
        resp.keep_alive = self.parser.should_keep_alive()
        resp.head_done = True
        resp.wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if resp.released:  # the reader let go; the rest is dropped
            return
        resp.parts.append(body)
        resp.buffered += len(body)
        if resp.buffered > PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp.wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.finish()

    # the pool's side
    def send(self, data: bytes, resp: _Response) -> None:
        self.resp = resp
        assert self.transport is not None
        self.transport.write(data)

    def drained(self, resp: _Response) -> None:
        resp.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class _Response:
    """One exchange's answer, filled by its connection as bytes arrive."""

    __slots__ = ("_conn", "_loop", "_read_timeout", "_timer", "_waiter", "buffered", "content",
                 "ctype", "done", "drain", "error", "framed", "got_bytes", "head_done",
                 "keep_alive", "parts", "released", "status_code")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._conn = conn
        self._loop = loop
        self._read_timeout = read_timeout
        self._waiter: asyncio.Future[None] | None = None
        self.status_code = 0
        self.ctype = ""
        self.parts: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.content = b""
        self.head_done = False
        self.framed = False
        self.keep_alive = False
        self.got_bytes = False
        self.done = False
        self.released = False
        self.drain = False
        self._timer: asyncio.TimerHandle | None = None
        self.error: BaseException | None = None

    # connection side
    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self) -> None:
        self.done = True
        if self.released:  # drained after its reader let go: back to the pool
            self._settle()
        else:
            self.wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not self.done:
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
        if not self.head_done:
            raise self.error or httpx.ReadError("upstream answered nothing")

    async def blocks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever bytes are there at each read."""
        parts = self.parts
        while True:
            if parts:
                data = b"".join(parts) if len(parts) > 1 else parts[0]
                parts.clear()
                self._conn.drained(self)
                yield data
            elif self.done:
                if self.error is not None:
                    raise self.error
                return
            else:
                await self._wait()

    async def aread(self) -> bytes:
        while not self.done:
            await self._wait()
        if self.error is not None:
            raise self.error
        self.content = b"".join(self.parts)
        self.parts.clear()
        self._conn.drained(self)
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


class UpstreamHTTP:
    """One keep-alive pool to one base URL; created inside the running loop (start())."""

    def __init__(self, base_url: str, headers: Mapping[str, str], connect_timeout: float,
                 read_timeout: float, max_connections: int, keepalive_s: float = 30.0) -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream URL {base_url!r} is not an http(s) URL")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path
        default_port = (url.scheme == "https" and self.port == 443) or (url.scheme == "http" and self.port == 80)
        host_header = url.netloc.rpartition("@")[2] if not default_port else self.host
        fixed = {"host": host_header, "accept-encoding": "identity", **{k.lower(): v for k, v in headers.items()}}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lines: dict[tuple[str, str], bytes] = {}
        self._closed = False

    # ---- connections --------------------------------------------------------------------

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection (kept alive, or new) and whether it was reused."""
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.keepalive_s:
                conn.close()
                self.forget(conn)
                continue
            return conn, True
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
            return await self._connect(), False
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port} ({exc.strerror or exc})") from None
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
        """Send; return once the status line and headers are in (the body streams after)."""
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
        loop = asyncio.get_running_loop()
        read_timeout = self.read_timeout if timeout is None else timeout
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            resp = _Response(conn, loop, read_timeout)
            try:
                conn.send(data, resp)
                await resp.head()
                return resp
            except httpx.ConnectError:
                resp.release()
                if reused and attempt == 0:  # the upstream dropped an idle connection: a new one
                    continue
                raise
            except BaseException:
                resp.release()
                raise
        raise httpx.ConnectError("upstream closed the connection before answering")  # not reached

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("the upstream client is closed"))
        self._waiters.clear()
