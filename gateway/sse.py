"""OpenAI response bodies and server-sent events, built from backend chunks."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import GatewayError
from gateway.shutdown import Drain

log = logging.getLogger("gateway.sse")

DONE = b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _TextFrames:
    """The event of a text chunk, pre-encoded around the text: per chunk only the text is
    encoded (the hot path of a stream). Byte-identical to _event() of the same dict."""

    def __init__(self, ctx: RequestContext, env: dict[str, Any], usage_field: dict[str, Any]) -> None:
        marker = "\x00"
        probe = _event({**env, "choices": [_choice(ctx, marker, None, False)], **usage_field})
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


def _choice(ctx: RequestContext, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
    if ctx.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


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
    # Events are written together while the backend already holds the next chunk
    # (Chunk.more): one socket write per arrival from the backend, not one per event.
    pending: list[bytes] = []
    try:
        if ctx.kind == "chat":
            pending.append(_event({**env, "choices": [_choice(ctx, "", None, True)], **usage_field}))
        chunk = first
        while chunk is not None:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.text:
                pending.append(text_event(chunk.text))
            if chunk.finish_reason is not None:  # the last chunk: answer now, release after
                last = _choice(ctx, None, chunk.finish_reason, False)
                pending.append(_event({**env, "choices": [last], **usage_field}))
                break
            if not chunk.more and pending:
                yield b"".join(pending) if len(pending) > 1 else pending[0]
                pending = []
            try:
                chunk = await pull(chunks)
            except StopAsyncIteration:
                break
        if ctx.include_usage and usage is not None:
            pending.append(_event({**env, "choices": [], "usage": usage.as_dict()}))
        pending.append(DONE)
        yield b"".join(pending)
    except GatewayError as exc:
        yield b"".join([*pending, exc.sse_event()])
    except Exception:
        log.exception("request %s failed mid-stream", ctx.request_id)
        error = GatewayError("The backend failed while streaming this response.").sse_event()
        yield b"".join([*pending, error])
    finally:
        await chunks.aclose()


async def collect(ctx: RequestContext, chunks: AsyncIterator[Chunk],
                  drain: Drain | None = None) -> dict[str, Any]:
    """Aggregate a whole generation into one OpenAI response object, up to its last chunk
    (the one with a finish_reason). `drain`: each chunk is pulled through Drain.next (ends
    the generation at shutdown). The caller closes `chunks` (after answering)."""
    parts: list[str] = []
    finish = "stop"
    usage = Usage(prompt_tokens=ctx.prompt_tokens or 0, completion_tokens=0)
    pull = drain.next if drain is not None else anext
    while True:
        try:
            chunk = await pull(chunks)
        except StopAsyncIteration:
            break
        parts.append(chunk.text)
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
            break
    text = "".join(parts)
    env = _envelope(ctx)
    if ctx.kind == "chat":
        env["object"] = "chat.completion"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**env, "choices": [choice], "usage": usage.as_dict()}
