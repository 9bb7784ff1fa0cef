"""A fast fake OpenAI-compatible upstream: raw asyncio HTTP/1.1 with keep-alive.

`POST /v1/chat/completions` answers a fixed completion, as JSON or (with `"stream": true`) as
SSE in a few chunks (usage last when `stream_options.include_usage` is asked); `GET
/v1/models` lists one model. Run: python -m bench.overhead.upstream --port P.
"""

from __future__ import annotations

import argparse
import asyncio
import json

MODEL = "bench-model"
WORDS = ("Hello", " from", " the", " fake", " upstream", ".")
_ENV = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL}
USAGE = {"prompt_tokens": 12, "completion_tokens": len(WORDS), "total_tokens": 12 + len(WORDS)}


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    return _event({**_ENV, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]})


def stream_events(include_usage: bool) -> list[bytes]:
    events = [_chunk({"role": "assistant", "content": ""}, None)]
    events += [_chunk({"content": w}, None) for w in WORDS]
    events.append(_chunk({}, "stop"))
    if include_usage:
        events.append(_event({**_ENV, "choices": [], "usage": USAGE}))
    events.append(b"data: [DONE]\n\n")
    return events


def completion_body() -> bytes:
    return json.dumps({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE}, separators=(",", ":")).encode()


def _head(status: str, ctype: bytes, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype + b"\r\n" + framing
            + b"\r\nconnection: keep-alive\r\n\r\n")


class Responses:
    """Every answer pre-encoded once."""

    def __init__(self) -> None:
        body = completion_body()
        self.json = _head("200 OK", b"application/json", len(body)) + body
        models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model",
                                                         "created": 0, "owned_by": "bench"}]}).encode()
        self.models = _head("200 OK", b"application/json", len(models)) + models
        self.not_found = _head("404 Not Found", b"text/plain", 0)
        head = _head("200 OK", b"text/event-stream", None)
        self.stream = {u: [head] + [b"%x\r\n%s\r\n" % (len(e), e) for e in stream_events(u)]
                       + [b"0\r\n\r\n"] for u in (False, True)}


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, responses: Responses) -> None:
        self.r = responses
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15:stop if stop >= 0 else None])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4:total]
            self.buf = self.buf[total:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith(b"get /v1/models"):
            self.transport.write(self.r.models)
        elif not head.startswith(b"post /v1/chat/completions"):
            self.transport.write(self.r.not_found)
        elif b'"stream":true' in body or b'"stream": true' in body:
            parts = self.r.stream[b"include_usage" in body]
            self.transport.write(b"".join(parts[:2]))  # headers + first event now, rest next tick
            asyncio.get_running_loop().call_soon(self._rest, parts[2:])
        else:
            self.transport.write(self.r.json)

    def _rest(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(parts))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    responses = Responses()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(responses), "127.0.0.1", port,
                                      backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
