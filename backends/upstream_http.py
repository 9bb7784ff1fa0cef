"""The HTTP client of the `openai` backend kind: aiohttp's keep-alive pool, httpx's errors.

Chosen by measurement (bench/overhead/clients.py, README "Performance"): one streamed chat
completion costs about 3-4x less CPU through aiohttp than through httpx's own pool, and
about 3x less than httpx over an aiohttp transport (httpx's request/response models and line
decoders are the rest of the cost). Errors are raised as httpx's exception classes
(ConnectError, ConnectTimeout, ReadTimeout, ReadError) so that callers keep one well-known
tree for retries and rotation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import aiohttp
import httpx
import orjson
import yarl


class Upstream(Protocol):
    """What the `openai` kind needs of an HTTP client (one base URL)."""

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class UpstreamResponse:
    """A response whose body is read as it arrives: `lines()` for SSE, `aread()` for all."""

    __slots__ = ("_resp", "content", "status_code")

    def __init__(self, resp: aiohttp.ClientResponse | httpx.Response) -> None:
        self._resp = resp
        self.status_code = resp.status if isinstance(resp, aiohttp.ClientResponse) else resp.status_code
        self.content = b""

    async def lines(self) -> AsyncIterator[bytes]:
        """Each line of the body, with its line ending."""
        resp = self._resp
        if isinstance(resp, httpx.Response):
            async for text in resp.aiter_lines():
                yield text.encode() + b"\n"
            return
        try:
            async for line in resp.content:
                yield line
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "upstream read timed out") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def blocks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever bytes are there at each read."""
        resp = self._resp
        if isinstance(resp, httpx.Response):
            async for part in resp.aiter_bytes():
                yield part
            return
        try:
            async for part in resp.content.iter_any():
                yield part
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "upstream read timed out") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    async def aread(self) -> bytes:
        if isinstance(self._resp, httpx.Response):
            self.content = await self._resp.aread()
            return self.content
        try:
            self.content = await self._resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "upstream read timed out") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        return self.content

    def is_json(self) -> bool:
        """The body is one JSON document (application/json or +json); anything else, a
        missing type included, is read as server-sent events."""
        resp = self._resp
        if isinstance(resp, httpx.Response):
            ctype = resp.headers.get("content-type", "")
        else:
            ctype = resp.headers.get("Content-Type", "")
        media = ctype.partition(";")[0].strip().lower()
        return media == "application/json" or media.endswith("+json")

    def json(self) -> Any:
        """The body read by aread(), parsed (ValueError if it is not JSON)."""
        return orjson.loads(self.content)

    async def aclose(self) -> None:
        # A body read to its end leaves the connection in the pool; a cut one closes it.
        if isinstance(self._resp, httpx.Response):
            await self._resp.aclose()
        else:
            self._resp.release()


class HttpxUpstream:
    """The same over an httpx.AsyncClient (tests drive it with httpx.MockTransport)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> UpstreamResponse:
        hdrs = {**(headers or {}), **({"content-type": "application/json"} if body else {})}
        req = self.client.build_request(method, path, content=body, headers=hdrs,
                                        **({"timeout": timeout} if timeout is not None else {}))
        return UpstreamResponse(await self.client.send(req, stream=True))

    async def aclose(self) -> None:
        await self.client.aclose()


class UpstreamHTTP:
    """One keep-alive pool to one base URL; created inside the running loop (start())."""

    def __init__(self, base_url: str, headers: Mapping[str, str], connect_timeout: float,
                 read_timeout: float, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._urls: dict[str, yarl.URL] = {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                              sock_read=read_timeout)
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30.0)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=dict(headers), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> UpstreamResponse:
        """Send; return once the status line and headers are in (the body streams after)."""
        t = self._timeout if timeout is None else aiohttp.ClientTimeout(
            total=timeout, sock_connect=timeout)
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["content-type"] = "application/json"
        try:
            url = self._urls.get(path)
            if url is None:  # parsed once per path, not per request
                url = self._urls[path] = yarl.URL(self.base_url + path)
            resp = await self._session.request(method, url, data=body,
                                               headers=hdrs, timeout=t, allow_redirects=False)
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "upstream connect timed out") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "upstream timed out") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            # A kept-alive connection the upstream closed meanwhile counts as a connect error:
            # nothing was answered, so the caller may retry.
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        return UpstreamResponse(resp)

    async def aclose(self) -> None:
        await self._session.close()
