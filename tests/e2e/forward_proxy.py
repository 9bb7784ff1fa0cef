"""A forward HTTP proxy on loopback for tests: absolute-form requests and CONNECT tunnels,
bytes relayed as they are, every request line and Proxy-Authorization it carried recorded."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

from tests.loop_thread import serving_in_thread
from tests.server import free_port

_REQUEST_LINE = re.compile(rb"(GET|POST|CONNECT) (\S+) HTTP/1\.1\r\n")
_PROXY_AUTH = re.compile(rb"(?i)\r\nproxy-authorization: ([^\r]+)")


class ForwardProxy:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str]] = []  # (method, target)
        self.authorizations: list[str] = []

    def _observe(self, data: bytes) -> None:
        for m in _REQUEST_LINE.finditer(data):
            self.requests.append((m.group(1).decode(), m.group(2).decode()))
        self.authorizations += [m.group(1).decode() for m in _PROXY_AUTH.finditer(data)]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self._observe(head)
            method, target = head.split(b" ", 2)[:2]
            if method == b"CONNECT":
                host, _, port = target.decode().rpartition(":")
                up_r, up_w = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = b""
            else:
                url = urlsplit(target.decode())
                up_r, up_w = await asyncio.open_connection(url.hostname, url.port or 80)
                first = head
            up_w.write(first)
            await asyncio.gather(self._pipe(reader, up_w, observe=method != b"CONNECT"),
                                 self._pipe(up_r, writer, observe=False))
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, observe: bool) -> None:
        try:
            while data := await src.read(65536):
                if observe:
                    self._observe(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[ForwardProxy]:
        with serving_in_thread(self._client, self.port):
            yield self
