"""An `openai` upstream for rollout tests whose behaviour the test changes while it runs:
every `fail_every`-th request answers 500, each answer waits `delay_s` before its first byte,
and it counts what it answered (chat completions, JSON or a stream)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

from tests.loop_thread import serving_in_thread
from tests.server import free_port


class RolloutUpstream:
    def __init__(self, text: str = "the same answer", delay_s: float = 0.0,
                 fail_every: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.text = text
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.requests = 0  # chat completions asked
        self.failed = 0
        self.users: list[str | None] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v for k, v in
                           (line.split(": ", 1) for line in lines[1:] if ": " in line)}
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                if not lines[0].startswith("POST"):  # the backend's probe (GET /models)
                    self._write(writer, 200, b'{"object": "list", "data": []}')
                    await writer.drain()
                    continue
                await self._answer(json.loads(raw or b"{}"), writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    def _write(w: asyncio.StreamWriter, status: int, body: bytes,
               ctype: str = "application/json") -> None:
        w.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}"
                "\r\n\r\n".encode() + body)

    async def _answer(self, body: dict[str, object], w: asyncio.StreamWriter) -> None:
        self.requests += 1
        self.users.append(body.get("user") if isinstance(body.get("user"), str) else None)  # type: ignore[arg-type]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_every and self.requests % self.fail_every == 0:
            self.failed += 1
            self._write(w, 500, json.dumps({"error": {"message": "candidate exploded",
                                                      "type": "server_error"}}).encode())
            await w.drain()
            return
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        if body.get("stream"):
            events = [
                {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": self.text},
                              "finish_reason": None}]},
                {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [], "usage": usage},
            ]
            payload = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            self._write(w, 200, payload + b"data: [DONE]\n\n", "text/event-stream")
        else:
            self._write(w, 200, json.dumps({
                "id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                             "finish_reason": "stop"}], "usage": usage}).encode())
        await w.drain()

    @contextlib.contextmanager
    def running(self) -> Iterator[RolloutUpstream]:
        with serving_in_thread(self._handle, self.port):
            yield self
