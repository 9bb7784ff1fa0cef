"""A tiny OpenAI-ish upstream on loopback whose failure is chosen by the request's model name.

  ok         a normal stream (two chunks, usage, [DONE])
  http500    500 with a JSON error body
  badjson    200, then an SSE event whose data is not JSON
  badsse     200, then bytes that are not SSE at all, then the connection closes
  midstream  one chunk, then the connection closes (no [DONE])
  hang       accepts, never answers (the gateway's read timeout fires)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

from tests.loop_thread import serving_in_thread
from tests.server import free_port


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(text: str, finish: str | None = None) -> bytes:
    return _event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


class FakeUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.authorizations: list[str] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
            headers = {k.lower(): v for k, v in headers.items()}
            self.authorizations.append(headers.get("authorization", ""))
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            mode = json.loads(body or b"{}").get("model", "ok") if body else "ok"
            await self._answer(mode, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, mode: str, w: asyncio.StreamWriter) -> None:
        sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        if mode == "hang":
            await asyncio.sleep(60)
        elif mode == "http500":
            body = json.dumps({"error": {"message": "upstream exploded", "type": "server_error"}}).encode()
            w.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                    b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        elif mode == "badjson":
            w.write(sse + b"data: {not json at all\n\n")
        elif mode == "badsse":
            w.write(sse + b"\x00\xff garbage that is not server-sent events\n")
        elif mode == "midstream":
            w.write(sse + _chunk("partial "))
            await w.drain()
            await asyncio.sleep(0.2)
        else:
            w.write(sse + _chunk("hello ") + _chunk("world", "stop")
                    + _event({"id": "x", "object": "chat.completion.chunk", "created": 0,
                              "model": "m", "choices": [],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
                    + b"data: [DONE]\n\n")
        await w.drain()

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeUpstream]:
        with serving_in_thread(self._handle, self.port):
            yield self
