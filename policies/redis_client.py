"""A small Redis client for the shared state's scripts: one pipelined connection, RESP
framing by hiredis, EVALSHA with a fallback to EVAL when the server does not know a script.

Why not redis-py's asyncio client: the shared state makes one or two script calls per request
on the hot path, and redis-py spent about 160 µs of CPU on each (connection pool, command
layers) on the development VM, against about 25 µs here (docs/deployment.md "Scale-out", measured). Every
caller shares the one connection: replies come back in the order the commands went out, so
concurrent requests pipeline for free. URLs: redis:// and rediss:// (TLS), a username and
password (`redis://user:pass@host:6379/0`), the database number. Sentinel and Cluster are not
spoken: point the URL at the primary (a Sentinel-aware proxy or a Service in front of it).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


class RedisError(Exception):
    """The server answered an error (a script's runtime error, a wrong command)."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=RedisError)
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:
                continue
            fut = self.pending.popleft()
            if fut.done():
                continue  # its caller gave up (timed out); the reply is dropped
            if isinstance(reply, RedisError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError(str(self.lost)))

    def send(self, payload: bytes, timeout: float | None = None) -> asyncio.Future[Any]:
        """Writes the command now (a caller cancelled while it waits for the reply has still
        sent it); the reply's future fails with TimeoutError after `timeout` seconds."""
        if self.transport is None or self.lost is not None or self.transport.is_closing():
            raise ConnectionError("not connected to Redis")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.pending.append(fut)
        self.transport.write(payload)
        if timeout is not None:
            timer = loop.call_later(timeout, _expire, fut)
            fut.add_done_callback(lambda _: timer.cancel())
        return fut


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("Redis did not answer in time"))


def encode(*args: object) -> bytes:
    """A command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        b = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class RedisClient:
    def __init__(self, url: str, connect_timeout: float = 0.5) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("the Redis URL must start with redis:// or rediss://")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.db = int(parts.path.strip("/") or 0)
        self.tls = parts.scheme == "rediss"
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._known: set[str] = set()  # script digests the server has

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        if self._connecting is None:  # one connect for everyone waiting
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self.tls else None
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port, ssl=context),
            self.connect_timeout)
        if self.password is not None:
            auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            await conn.send(encode(*auth))
        if self.db:
            await conn.send(encode("SELECT", self.db))
        self._known.clear()  # a new server (or a restarted one) may not have our scripts
        self._conn = conn
        return conn

    async def call(self, *args: object, timeout: float | None = None) -> Any:
        """One command; its reply. Connected already, the command is written before the first
        suspension (so a cancelled caller has sent it)."""
        return await (await self._connection()).send(encode(*args), timeout)

    async def script(self, lua: str, keys: list[str], args: list[object],
                     timeout: float | None = None) -> Any:
        """EVALSHA; EVAL the first time (or after NOSCRIPT), which also loads the script."""
        sha = hashlib.sha1(lua.encode()).hexdigest()
        if sha in self._known:
            try:
                return await self.call("EVALSHA", sha, len(keys), *keys, *args, timeout=timeout)
            except RedisError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                self._known.discard(sha)
        reply = await self.call("EVAL", lua, len(keys), *keys, *args, timeout=timeout)
        self._known.add(sha)
        return reply

    async def aclose(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
