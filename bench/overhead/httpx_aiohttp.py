"""An httpx transport over aiohttp's connection pool: the middle option of
bench/overhead/clients.py (httpx's API and request/response models, aiohttp's pool and parser).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

# Framing headers aiohttp writes itself from the body it is given.
_SKIP = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, resp: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._resp = resp
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._resp.content.iter_any():
                yield part
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=self._request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) from exc

    async def aclose(self) -> None:
        # A body read to its end leaves the connection in the pool; a cut one closes it.
        self._resp.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """`handle_async_request` on one aiohttp.ClientSession, created on first use (inside the
    running loop) and closed with the httpx client."""

    def __init__(self, max_connections: int = 256, keepalive_s: float = 30.0) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.get("connect"),
                                        sock_read=t.get("read"))
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request.headers.raw if k.lower() not in _SKIP]
        body = await request.aread()
        try:
            resp = await self._get_session().request(
                request.method, str(request.url), data=body or None, headers=headers,
                timeout=timeout, allow_redirects=False, skip_auto_headers=("User-Agent",))
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(resp.status, headers=list(resp.raw_headers),
                              stream=_ResponseStream(resp, request), request=request,
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
