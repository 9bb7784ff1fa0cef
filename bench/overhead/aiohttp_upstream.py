"""The `openai` kind's generation client on aiohttp instead of memgate's own pool
(backends/upstream_http.py): the other side of the client choice in docs/performance.md "Performance".

`python -m bench.overhead.aiohttp_gateway serve ...` runs `gateway serve` with this client;
`python -m bench.overhead --client-compare` measures both gateways side by side. Same
interface and error classes as the pool (httpx's), aiohttp's own behaviour otherwise: 1xx
skipped, gzip/deflate decoded, 8 KiB header lines. Tuned to be fair to aiohttp: the proxy is
looked up once (not per request, as trust_env=True would), the timeouts object made once.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import orjson

from gateway.core.media import is_json_media


class AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status_code = resp.status
        self.retry_after = resp.headers.get("retry-after")
        self.content = b""

    async def blocks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._resp.content.iter_any():
                yield data
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "upstream read timed out") from None
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None

    async def aread(self) -> bytes:
        parts = [data async for data in self.blocks()]
        self.content = b"".join(parts)
        return self.content

    def is_json(self) -> bool:
        return is_json_media(self._resp.headers.get("content-type", ""))

    def json(self) -> Any:
        return orjson.loads(self.content)

    def expect_end(self) -> None:
        return None

    async def aclose(self) -> None:
        self._resp.release()  # back to the pool when read to its end, else closed


class AiohttpUpstream:
    """Same constructor as backends.upstream_http.UpstreamHTTP (extra keywords ignored)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], connect_timeout: float,
                 read_timeout: float, max_connections: int, keepalive_s: float = 30.0,
                 **_: Any) -> None:
        self.base = base_url.rstrip("/")
        self.headers = dict(headers)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:  # inside the running loop
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self.max_connections,
                                               keepalive_timeout=self.keepalive_s))
            host = urlsplit(self.base).hostname or ""
            if not urllib.request.proxy_bypass_environment(host):
                scheme = urlsplit(self.base).scheme
                self._proxy = urllib.request.getproxies_environment().get(scheme)
        return self._session

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> AiohttpResponse:
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["content-type"] = "application/json"
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = aiohttp.ClientTimeout(sock_connect=self.connect_timeout,
                                                     sock_read=timeout)
        session = self._open()
        try:
            resp = await session.request(method, self.base + path, data=body, headers=hdrs,
                                         proxy=self._proxy, **extra)
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc)) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out") from None
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "upstream read timed out") from None
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None
        return AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
