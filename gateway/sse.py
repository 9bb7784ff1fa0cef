"""OpenAI response bodies and server-sent events, built from backend chunks.

Two kinds of chunk reach here. A remote kind passes its upstream's answer through
(Chunk.event: each SSE event, or the whole JSON answer): it goes out as the upstream sent it,
with only `model` renamed to the tier that answered, and, where the gateway asked the upstream
for usage the client did not ask for, the usage event held back. The local engine's chunks
carry text, logprobs and tool-call deltas per choice, which are built into OpenAI's shapes here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import GatewayError
from gateway.shutdown import Drain

log = logging.getLogger("gateway.sse")

DONE = b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def rename(ctx: RequestContext, event: dict[str, Any]) -> dict[str, Any]:
    """An upstream's event or answer with `model` naming the tier that answered (also inside
    a Responses event's `response`)."""
    if "model" in event:
        event["model"] = ctx.target_model
    inner = event.get("response")
    if isinstance(inner, dict) and "model" in inner:
        inner["model"] = ctx.target_model
    return event


def passthrough_event(ctx: RequestContext, event: dict[str, Any]) -> bytes | None:
    """One upstream SSE event for the client; None: the usage event only the gateway asked for."""
    if ctx.usage_injected:
        if event.get("choices") == [] and event.get("usage") is not None:
            return None
        if "usage" in event and event["usage"] is None:
            del event["usage"]
    data = orjson.dumps(rename(ctx, event))
    kind = event.get("type")
    if ctx.kind == "responses" and isinstance(kind, str):
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


class _TextFrames:
    """The event of a text chunk of choice 0, pre-encoded around the text: per chunk only the
    text is encoded (the hot path of a stream). Byte-identical to _event() of the same dict."""

    def __init__(self, ctx: RequestContext, env: dict[str, Any], usage_field: dict[str, Any]) -> None:
        marker = "\x00"
        probe = _event({**env, "choices": [_choice(ctx, 0, marker, None, False)], **usage_field})
        self._head, _, self._tail = probe.partition(orjson.dumps(marker))

    def __call__(self, text: str) -> bytes:
        return self._head + orjson.dumps(text) + self._tail


def response_id(ctx: RequestContext) -> str:
    """The answer's `id` (also the span's gen_ai.response.id)."""
    return ("chatcmpl-" if ctx.kind == "chat" else "cmpl-") + ctx.request_id


def _envelope(ctx: RequestContext) -> dict[str, Any]:
    chat = ctx.kind == "chat"
    return {
        "id": response_id(ctx),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(ctx.created),
        "model": ctx.target_model,
    }


def _choice(ctx: RequestContext, index: int, text: str | None, finish: str | None, first: bool,
            chunk: Chunk | None = None, offset: int = 0) -> dict[str, Any]:
    logprobs = None
    if chunk is not None and chunk.logprobs is not None:
        logprobs = ({"content": chunk.logprobs} if ctx.kind == "chat"
                    else completion_logprobs(chunk.logprobs, offset))
    if ctx.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if chunk is not None and chunk.tool_calls:
            delta["tool_calls"] = chunk.tool_calls
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Chat-shaped token entries -> the completions API's logprobs object."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", ())}
                         for e in entries],
        "text_offset": offsets,
    }


async def stream_events(ctx: RequestContext, chunks: AsyncGenerator[Chunk, None],
                        first: Chunk | None = None, drain: Drain | None = None
                        ) -> AsyncGenerator[bytes, None]:
    """SSE exactly as OpenAI streams: one id, role first, finish_reason, usage, [DONE].

    `first`: a chunk already taken from `chunks` (None: the stream ended before one came).
    `drain`: pulls each chunk through Drain.next (ends the stream at shutdown) without an
    extra generator layer per chunk. A failure after the first byte becomes an `error` event,
    and the stream ends without [DONE] so that no client mistakes it for a complete answer.
    """
    env = _envelope(ctx)
    usage_field = {"usage": None} if ctx.include_usage else {}
    usage: Usage | None = None
    text_event = _TextFrames(ctx, env, usage_field)
    pull = drain.next if drain is not None else anext
    passthrough = first is not None and first.event is not None
    offsets: dict[int, int] = {}  # completions' text_offset per choice
    # Events are written together while the backend already holds the next chunk
    # (Chunk.more): one socket write per arrival from the backend, not one per event.
    pending: list[bytes] = []
    try:
        if ctx.kind == "chat" and not passthrough:
            for i in range(ctx.sampling.n):
                pending.append(_event({**env, "choices": [_choice(ctx, i, "", None, True)],
                                       **usage_field}))
        chunk = first
        while chunk is not None:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.event is not None:
                data = passthrough_event(ctx, chunk.event)
                if data is not None:
                    pending.append(data)
            elif chunk.index == 0 and chunk.logprobs is None and not chunk.tool_calls:
                if chunk.text:
                    pending.append(text_event(chunk.text))
            elif chunk.text or chunk.logprobs or chunk.tool_calls:
                offset = offsets.get(chunk.index, 0)
                offsets[chunk.index] = offset + len(chunk.text)
                text = chunk.text if chunk.text or ctx.kind != "chat" else None
                choice = _choice(ctx, chunk.index, text, None, False, chunk, offset)
                pending.append(_event({**env, "choices": [choice], **usage_field}))
            ended = chunk.ended or chunk.finish_reason
            if ended is not None and not passthrough:
                last = _choice(ctx, chunk.index, None, ended, False)
                pending.append(_event({**env, "choices": [last], **usage_field}))
            if chunk.finish_reason is not None:  # the last chunk: answer now, release after
                break
            if not chunk.more and pending:
                yield b"".join(pending) if len(pending) > 1 else pending[0]
                pending = []
            try:
                chunk = await pull(chunks)
            except StopAsyncIteration:
                break
        if ctx.include_usage and usage is not None and not passthrough:
            pending.append(_event({**env, "choices": [], "usage": usage.as_dict()}))
        if ctx.kind != "responses":
            pending.append(DONE)
        if pending:
            yield b"".join(pending)
    except GatewayError as exc:
        yield b"".join([*pending, exc.sse_event()])
    except Exception:
        log.exception("request %s failed mid-stream", ctx.request_id)
        error = GatewayError("The backend failed while streaming this response.").sse_event()
        yield b"".join([*pending, error])
    finally:
        await chunks.aclose()


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    finish: str = "stop"

    def add(self, chunk: Chunk) -> None:
        self.parts.append(chunk.text)
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        for delta in chunk.tool_calls or ():
            i = delta.get("index", len(self.calls))
            while len(self.calls) <= i:
                self.calls.append({"id": "", "type": "function",
                                   "function": {"name": "", "arguments": ""}})
            call = self.calls[i]
            call["id"] = delta.get("id") or call["id"]
            fn = delta.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""


async def collect(ctx: RequestContext, chunks: AsyncIterator[Chunk],
                  drain: Drain | None = None) -> dict[str, Any]:
    """Aggregate a whole generation into one OpenAI response object, up to its last chunk
    (the one with a finish_reason). `drain`: each chunk is pulled through Drain.next (ends
    the generation at shutdown). The caller closes `chunks` (after answering)."""
    choices: dict[int, _Choice] = {}
    usage = Usage(prompt_tokens=ctx.prompt_tokens or 0, completion_tokens=0)
    pull = drain.next if drain is not None else anext
    while True:
        try:
            chunk = await pull(chunks)
        except StopAsyncIteration:
            break
        if chunk.event is not None:  # a remote kind's whole answer, as it sent it
            return rename(ctx, chunk.event)
        choice = choices.setdefault(chunk.index, _Choice())
        choice.add(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        ended = chunk.ended or chunk.finish_reason
        if ended is not None:
            choice.finish = ended
        if chunk.finish_reason is not None:
            break
    env = _envelope(ctx)
    out = []
    for index in sorted(choices) or [0]:
        c = choices.get(index, _Choice())
        text = "".join(c.parts)
        if ctx.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if c.calls:
                message["content"] = text or None
                message["tool_calls"] = c.calls
            lp = None if c.logprobs is None else {"content": c.logprobs, "refusal": None}
            out.append({"index": index, "message": message, "logprobs": lp,
                        "finish_reason": c.finish})
        else:
            lp = None if c.logprobs is None else completion_logprobs(c.logprobs, 0)
            out.append({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish})
    if ctx.kind == "chat":
        env["object"] = "chat.completion"
    return {**env, "choices": out, "usage": usage.as_dict()}
