"""The `openai` kind's own HTTP client (backends/upstream_http.py) against raw asyncio servers
on loopback whose bytes each test chooses: framing, keep-alive, pool bounds, every error."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from backends.upstream_http import UpstreamHTTP

pytestmark = pytest.mark.anyio
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
JSON_BODY = b'{"ok":true}'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Server:
    """A loopback server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                  **pool: float) -> AsyncIterator[tuple[Server, UpstreamHTTP]]:
    srv = Server(lambda r, w: handler(srv, r, w))
    srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
    client = UpstreamHTTP(srv.url, {"authorization": "Bearer up-key"},
                          connect_timeout=float(pool.get("connect", 2.0)),
                          read_timeout=float(pool.get("read", 5.0)),
                          max_connections=int(pool.get("max", 8)))
    try:
        yield srv, client
    finally:
        await client.aclose()
        srv.server.close()


def json_answer(body: bytes = JSON_BODY, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (len(body), extra)) + body


async def keep_alive_json(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await srv.read_request(reader)
        writer.write(json_answer())
        await writer.drain()


async def test_json_answers_reuse_one_connection() -> None:
    async with serving(keep_alive_json) as (srv, client):
        for _ in range(5):
            resp = await client.request("POST", "/chat/completions", b'{"a":1}', {"x-request-id": "r1"})
            assert resp.status_code == 200 and resp.is_json()
            assert await resp.aread() == JSON_BODY and resp.json() == {"ok": True}
            await resp.aclose()
        assert srv.connections == 1
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        for line in (b"authorization: Bearer up-key", b"x-request-id: r1",
                     b"content-type: application/json", b"content-length: 7"):
            assert line in first
        assert first.endswith(b'\r\n\r\n{"a":1}')


async def test_chunked_stream_arrives_as_it_is_sent() -> None:
    release = asyncio.Event()

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(handler) as (_, client):
        resp = await client.request("POST", "/chat/completions", b"{}")
        assert not resp.is_json()
        blocks = resp.blocks()
        assert await anext(blocks) == b"data: 1"  # before the rest was even sent
        release.set()
        assert [b async for b in blocks] == [b"data: 2"]
        await resp.aclose()


async def test_body_until_close() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"a\":")
        await writer.drain()
        writer.write(b"2}")
        await writer.drain()

    async with serving(handler) as (srv, client):
        resp = await client.request("POST", "/completions", b"{}")
        assert await resp.aread() == b'{"a":2}'
        await resp.aclose()
        resp = await client.request("POST", "/completions", b"{}")  # a new connection
        assert await resp.aread() == b'{"a":2}'
        assert srv.connections == 2


async def test_idle_connection_closed_by_upstream_is_replaced() -> None:
    """Found closed (readable: end of file) before the request is written: a new connection
    carries it, and the upstream sees each request once."""
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(json_answer())
        await writer.drain()
        # then close the kept-alive connection without a word (an upstream's idle timeout)

    async with serving(handler) as (srv, client):
        for _ in range(3):
            resp = await client.request("POST", "/chat/completions", b"{}")
            assert await resp.aread() == JSON_BODY
            await resp.aclose()
            await asyncio.sleep(0.05)
        assert srv.connections == 3 and len(srv.requests) == 3


async def test_refused_is_connect_error() -> None:
    async with serving(keep_alive_json) as (srv, client):
        assert srv.server is not None
        srv.server.close()
        await srv.server.wait_closed()
        with pytest.raises(httpx.ConnectError):
            await client.request("POST", "/chat/completions", b"{}")
        with pytest.raises(httpx.ConnectError):  # and again: the failed slot was given back
            await client.request("POST", "/chat/completions", b"{}")


async def test_no_answer_is_read_timeout_and_closes() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        await reader.read()  # never answers

    async with serving(handler, read=0.2) as (srv, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.request("POST", "/chat/completions", b"{}")
        await asyncio.sleep(0.05)
        assert srv.open == 0  # the connection was closed, not pooled


async def test_cut_mid_body_is_read_error() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\"")
        await writer.drain()

    async with serving(handler) as (_, client):
        resp = await client.request("POST", "/chat/completions", b"{}")
        with pytest.raises(httpx.ReadError):
            await resp.aread()
        await resp.aclose()


async def test_malformed_answer_is_read_error() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(handler) as (_, client):
        with pytest.raises(httpx.ReadError):
            await client.request("POST", "/chat/completions", b"{}")


async def test_pool_bound_is_kept_under_concurrency() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(reader)
            await asyncio.sleep(0.02)
            writer.write(json_answer())
            await writer.drain()

    async with serving(handler, max=2) as (srv, client):
        async def one() -> bytes:
            resp = await client.request("POST", "/chat/completions", b"{}")
            try:
                return await resp.aread()
            finally:
                await resp.aclose()

        assert await asyncio.gather(*(one() for _ in range(12))) == [JSON_BODY] * 12
        assert srv.most_open <= 2 and srv.connections == 2


async def test_released_early_closes_unless_the_end_was_seen() -> None:
    tail = asyncio.Event()

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\ne\r\ndata: [DONE]\n\n\r\n")
            await writer.drain()
            eof = asyncio.ensure_future(reader.read(1))
            await asyncio.wait([eof, asyncio.ensure_future(tail.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if eof.done():  # the client closed the connection
                return
            eof.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await eof
            tail.clear()
            writer.write(b"0\r\n\r\n")  # the terminating chunk in a later segment
            await writer.drain()

    async with serving(handler) as (srv, client):
        # 1. the reader saw its last event: the connection waits for the end and is reused
        resp = await client.request("POST", "/chat/completions", b"{}")
        assert await anext(resp.blocks()) == b"data: [DONE]\n\n"
        resp.expect_end()
        await resp.aclose()
        tail.set()
        await asyncio.sleep(0.05)
        resp = await client.request("POST", "/chat/completions", b"{}")
        assert srv.connections == 1
        # 2. a reader that stops early (a client gone) closes: the upstream stops generating
        await anext(resp.blocks())
        await resp.aclose()
        await asyncio.sleep(0.05)
        assert srv.open == 0


async def test_cancelled_while_waiting_frees_the_slot() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        await reader.read()

    async with serving(handler, max=1) as (srv, client):
        task = asyncio.ensure_future(client.request("POST", "/chat/completions", b"{}"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert srv.open == 0
        # the one slot is free again: the next request gets a connection (and times out there)
        client.read_timeout = 0.1
        with pytest.raises(httpx.ReadTimeout):
            await client.request("POST", "/chat/completions", b"{}")
        assert srv.connections == 2


def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 and a server context that presents it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    return cert, server_ctx


async def test_https_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS with certificate checks: a self-signed certificate for 127.0.0.1, trusted through
    SSL_CERT_FILE (as a deployment trusts a private CA)."""
    cert, server_ctx = self_signed(tmp_path)
    srv = Server(lambda r, w: keep_alive_json(srv, r, w))
    srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_ctx)
    url = srv.url.replace("http://", "https://")
    try:
        untrusted = UpstreamHTTP(url, {}, 2.0, 5.0, 4)
        with pytest.raises(httpx.ConnectError):  # not trusted yet: refused, not answered
            await untrusted.request("POST", "/chat/completions", b"{}")
        await untrusted.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        client = UpstreamHTTP(url, {}, 2.0, 5.0, 4)
        for _ in range(3):
            resp = await client.request("POST", "/chat/completions", b"{}")
            assert resp.status_code == 200 and await resp.aread() == JSON_BODY
            await resp.aclose()
        # the refused handshake never reached the handler; one connection served all three
        assert srv.connections == 1
        assert srv.requests[-1].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        await client.aclose()
    finally:
        srv.server.close()


# ---- hostile upstreams, at the pool's own level -----------------------------------


async def test_interim_responses_are_skipped_and_101_refused() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await srv.read_request(reader)
            if b"upgrade" in req:
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(json_answer())
            await writer.drain()

    async with serving(handler) as (srv, client):
        for _ in range(3):
            resp = await client.request("POST", "/chat/completions", b"{}")
            assert resp.status_code == 200 and await resp.aread() == JSON_BODY
            await resp.aclose()
        assert srv.connections == 1
        with pytest.raises(httpx.RemoteProtocolError):
            await client.request("POST", "/chat/completions", b'"upgrade"')


async def test_bytes_after_the_answer_close_the_connection() -> None:
    """In the same segment as the answer, or later on the idle connection: never read as the
    next request's answer."""
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        n = srv.connections
        if n == 1:
            writer.write(json_answer() + json_answer(b'{"stray":1}'))
        else:
            writer.write(json_answer())
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\n")  # later, on the idle connection
        await writer.drain()
        await reader.read()

    async with serving(handler) as (srv, client):
        for _ in range(3):
            resp = await client.request("POST", "/chat/completions", b"{}")
            assert await resp.aread() == JSON_BODY
            await resp.aclose()
            await asyncio.sleep(0.1)
        assert srv.connections == 3  # each connection was dropped, none reused


async def test_a_large_json_answer_is_read_whole() -> None:
    big = b'{"pad":"' + b"x" * (3 * 2**20) + b'"}'

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(reader)
            writer.write(json_answer(big))
            await writer.drain()

    async with serving(handler, read=2.0) as (srv, client):
        for _ in range(2):
            resp = await client.request("POST", "/chat/completions", b"{}")
            assert await resp.aread() == big
            await resp.aclose()
        assert srv.connections == 1


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_written_request_is_not_sent_again(how: str) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        if how == "reset":
            writer.transport.abort()

    async with serving(handler) as (srv, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.request("POST", "/chat/completions", b"{}")
        assert len(srv.requests) == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_answers_are_decoded(encoding: str) -> None:
    import gzip
    import zlib

    packed = gzip.compress(JSON_BODY) if encoding == "gzip" else zlib.compress(JSON_BODY)

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await srv.read_request(reader)
            if b"corrupt" in req:
                writer.write(json_answer(b"\x1f\x8bnot gzip", b"content-encoding: gzip\r\n"))
            elif b"br" in req:
                writer.write(json_answer(b"??", b"content-encoding: br\r\n"))
            else:
                writer.write(json_answer(packed, b"content-encoding: " + encoding.encode() + b"\r\n"))
            await writer.drain()

    async with serving(handler) as (_, client):
        resp = await client.request("POST", "/chat/completions", b"{}")
        assert await resp.aread() == JSON_BODY
        await resp.aclose()
        for body, error in ((b'"corrupt"', httpx.DecodingError), (b'"br"', httpx.DecodingError)):
            with pytest.raises(error):
                resp = await client.request("POST", "/chat/completions", body)
                await resp.aread()


async def test_heads_and_bodies_are_bounded() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await srv.read_request(reader)
        if b"head" in req:
            writer.write(b"HTTP/1.1 200 OK\r\nx-junk: " + b"j" * (2 * 2**20) + b"\r\n\r\n")
        elif b"zip" in req:  # 64 KiB on the wire, 8 MiB decoded
            import gzip

            writer.write(json_answer(gzip.compress(b"0" * 8 * 2**20), b"content-encoding: gzip\r\n"))
        else:
            writer.write(json_answer(b"x" * (2 * 2**20)))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    srv = Server(lambda r, w: handler(srv, r, w))
    srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
    client = UpstreamHTTP(srv.url, {}, 2.0, 5.0, 4, max_response_bytes=2**20)
    try:
        for body in (b'"head"', b'"body"', b'"zip"'):
            with pytest.raises(httpx.ReadError, match="larger than"):
                resp = await client.request("POST", "/chat/completions", body)
                await resp.aread()
    finally:
        await client.aclose()
        srv.server.close()


async def test_http_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.upstream_proxy import proxy_for
    from tests.e2e.forward_proxy import ForwardProxy

    with ForwardProxy().running() as proxy:
        async with serving(keep_alive_json) as (srv, _):
            url = srv.url
            monkeypatch.setenv("HTTP_PROXY", f"http://u%40x:p%3Aw@127.0.0.1:{proxy.port}")
            monkeypatch.setenv("NO_PROXY", "")
            via = proxy_for(url, trust_env=True)
            assert via is not None and "p:w" not in repr(via)
            client = UpstreamHTTP(url, {}, 2.0, 5.0, 4, proxy=via)
            for _ in range(2):
                resp = await client.request("POST", "/chat/completions", b"{}")
                assert await resp.aread() == JSON_BODY
                await resp.aclose()
            await client.aclose()
    assert proxy.requests == [("POST", f"{url}/chat/completions")] * 2
    assert proxy.authorizations == ["Basic dUB4OnA6dw=="] * 2  # base64 of u@x:p:w


async def test_https_through_a_connect_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.upstream_proxy import Proxy
    from tests.e2e.forward_proxy import ForwardProxy

    cert, server_ctx = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    srv = Server(lambda r, w: keep_alive_json(srv, r, w))
    srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_ctx)
    url = srv.url.replace("http://", "https://")
    try:
        with ForwardProxy().running() as proxy:
            via = Proxy(proxy.url, "127.0.0.1", proxy.port, None)
            client = UpstreamHTTP(url, {}, 2.0, 5.0, 4, proxy=via)
            for _ in range(3):
                resp = await client.request("POST", "/chat/completions", b"{}")
                assert await resp.aread() == JSON_BODY
                await resp.aclose()
            await client.aclose()
        port = url.split(":")[2].split("/")[0]
        assert proxy.requests == [("CONNECT", f"127.0.0.1:{port}")]  # one tunnel, kept alive
        assert srv.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    finally:
        srv.server.close()


def test_proxy_rules_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.upstream_proxy import proxy_for

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "proxy.internal:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:8080")
    assert proxy_for("http://api.example.com/v1", True).host == "proxy.internal"  # type: ignore[union-attr]
    assert proxy_for("https://api.example.com/v1", True).port == 8080  # type: ignore[union-attr]
    assert proxy_for("https://api.example.com/v1", False) is None
    monkeypatch.setenv("NO_PROXY", "example.com,10.1.2.3")
    assert proxy_for("https://api.example.com/v1", True) is None
    assert proxy_for("http://10.1.2.3:8000/v1", True) is None
    assert proxy_for("http://10.1.2.4:8000/v1", True) is not None
    monkeypatch.setenv("NO_PROXY", "*")
    assert proxy_for("http://anything/v1", True) is None
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ValueError, match="not supported"):
        proxy_for("https://api.example.com/v1", True)
