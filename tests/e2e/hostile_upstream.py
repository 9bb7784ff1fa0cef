"""A misbehaving OpenAI-compatible upstream on loopback: raw asyncio, the exact bytes each
misbehaviour needs, keep-alive connections (so that a confused client would carry one
request's bytes into the next), run in a thread beside the test.

The client chooses the behaviour per request in its last message: "<mode> <marker>". Every
answer that is not an error is the text "echo:<marker>" (split over a few SSE events when
streamed), so a client can tell its own answer from anybody else's.

Modes:
  plain         a normal answer
  early-hints   103 Early Hints first, the real answer a moment later on the same connection
  extra-bytes   the answer and, in the same write, a second whole response ("INJECTED")
  extra-nodone  the same, the first answer's stream ending after its finish_reason and usage
                without `data: [DONE]` (the HTTP message itself ends properly)
  big-json      a JSON answer of about 10 MB (non-streamed)
  close         reads the request, closes the connection without a byte
  reset         reads the request, resets the connection (RST)
  gzip          the answer gzip-encoded (content-encoding: gzip, whatever was asked)
  bom           an SSE answer that opens with a UTF-8 byte-order mark
  multiline     SSE events whose JSON is split over two data: lines, CR line endings
  rate-limited  429 with Retry-After: 17 and an OpenAI-shaped rate-limit error
  invalid       400 with an OpenAI-shaped error naming a param
  huge-head     a 20 MB response header, then the connection closes (`huge_head_sent`
                records whether all of it could be written: only if the client read it all)
  huge-body     a 17 MiB JSON answer (past the test config's max_response_bytes)
  slow          the answer in pieces 50 ms apart (within any sane read timeout)
  stall         the head and one event, then nothing for 5 s
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.loop_thread import serving_in_thread
from tests.server import free_port

MODEL = "up-model"
BIG_PAD = 10 * 2**20
HUGE_BODY = 17 * 2**20


def parse_prompt(text: str) -> tuple[str, str]:
    mode, _, marker = text.partition(" ")
    return mode, marker


def answer_text(marker: str) -> str:
    return f"echo:{marker}"


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _delta(text: str | None, finish: str | None = None) -> dict[str, object]:
    delta = {"content": text} if text is not None else {}
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def sse_events(text: str) -> list[bytes]:
    """The answer as SSE events: role, the text in 3 pieces, finish, usage, [DONE]."""
    third = max(1, len(text) // 3)
    pieces = [text[:third], text[third:2 * third], text[2 * third:]]
    events = [_event(_delta("")) ] + [_event(_delta(p)) for p in pieces if p]
    events.append(_event(_delta(None, "stop")))
    events.append(_event({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0,
                          "model": MODEL, "choices": [],
                          "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                    "total_tokens": 8}}))
    events.append(b"data: [DONE]\n\n")
    return events


def json_body(text: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()


def json_response(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: application/json\r\n" + extra
            + b"content-length: %d\r\n\r\n" % len(body) + body)


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def sse_response(events: list[bytes]) -> bytes:
    return SSE_HEAD + b"".join(chunked(e) for e in events) + b"0\r\n\r\n"


@dataclass
class Received:
    mode: str
    marker: str
    stream: bool


@dataclass
class HostileUpstream:
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    huge_head_sent: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def count(self, mode: str, marker: str | None = None) -> int:
        return sum(1 for r in list(self.received)
                   if r.mode == mode and (marker is None or r.marker == marker))

    # ---- serving ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ")[0]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET":
                    writer.write(json_response(json.dumps(
                        {"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()))
                    await writer.drain()
                    continue
                req = json.loads(body)
                messages = req.get("messages") or [{"content": req.get("prompt", "")}]
                mode, marker = parse_prompt(str(messages[-1]["content"]))
                stream = bool(req.get("stream"))
                self.received.append(Received(mode, marker, stream))
                if not await self._answer(mode, marker, stream, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, mode: str, marker: str, stream: bool, w: asyncio.StreamWriter) -> bool:
        """Write the answer; False: the connection ends here."""
        text = answer_text(marker)
        normal = sse_response(sse_events(text)) if stream else json_response(json_body(text))
        if mode == "early-hints":
            w.write(b"HTTP/1.1 103 Early Hints\r\nlink: </hint.css>; rel=preload\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.15)
            w.write(normal)
        elif mode == "extra-bytes":
            w.write(normal + sse_response(sse_events("INJECTED")))
        elif mode == "extra-nodone":
            first = sse_response(sse_events(text)[:-1]) if stream else normal
            w.write(first + sse_response(sse_events("INJECTED")))
        elif mode == "big-json":
            w.write(json_response(json_body(text + " " + "x" * BIG_PAD)))
        elif mode == "close":
            return False
        elif mode == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            return False
        elif mode == "gzip":
            if stream:
                w.write(SSE_HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n")
                        + chunked(gzip.compress(b"".join(sse_events(text)))) + b"0\r\n\r\n")
            else:
                w.write(json_response(gzip.compress(json_body(text)),
                                      extra=b"content-encoding: gzip\r\n"))
        elif mode == "bom":
            events = sse_events(text)[1:]  # the first event carries text
            events[0] = b"\xef\xbb\xbf" + events[0]
            w.write(sse_response(events))
        elif mode == "multiline":
            events = [e.replace(b'"choices": ', b'"choices":\rdata: ').replace(b"\n", b"\r")
                      for e in sse_events(text)]
            w.write(sse_response(events))
        elif mode == "rate-limited":
            err = {"error": {"message": "Rate limit reached for requests", "type": "requests",
                             "param": None, "code": "rate_limit_exceeded"}}
            w.write(json_response(json.dumps(err).encode(), "429 Too Many Requests",
                                  b"retry-after: 17\r\n"))
        elif mode == "invalid":
            err = {"error": {"message": "'temperature' is out of range", "type":
                             "invalid_request_error", "param": "temperature", "code": None}}
            w.write(json_response(json.dumps(err).encode(), "400 Bad Request"))
        elif mode == "huge-head":
            w.write(b"HTTP/1.1 200 OK\r\nx-junk: " + b"j" * (20 * 2**20) + b"\r\n\r\n")
            try:
                await w.drain()
            except ConnectionError:
                self.huge_head_sent.append(False)
                raise
            self.huge_head_sent.append(True)
            return False
        elif mode == "huge-body":
            w.write(json_response(json_body(text + " " + "x" * HUGE_BODY)))
        elif mode == "slow":
            data = normal
            for i in range(0, len(data), max(1, len(data) // 4)):
                w.write(data[i:i + max(1, len(data) // 4)])
                await w.drain()
                await asyncio.sleep(0.05)
        elif mode == "stall":
            events = sse_events(text)
            w.write(SSE_HEAD + chunked(events[0]) if stream else b"HTTP/1.1 200 OK\r\n")
            await w.drain()
            await asyncio.sleep(5)
            return False
        else:
            w.write(normal)
        await w.drain()
        return True

    @contextlib.contextmanager
    def running(self) -> Iterator[HostileUpstream]:
        with serving_in_thread(self._connection, self.port, limit=2**20):
            yield self
