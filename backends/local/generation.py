"""One request on the engine: its sequences (n per prompt, for every prompt of a list), each
with its own sampler, grammar constraint and logprobs; the engine's events back as chunks.

Choice index i = prompt * n + j, as OpenAI numbers them. Every choice but the last to end
ends with a chunk whose `ended` is its finish reason; the last one's chunk carries the
finish_reason and the usage of all of them (Chunk's contract: it is the last chunk).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from backends.hf.tokenizer import ChatTokenizer
from backends.local.engine import Engine, EngineClosed, Event
from backends.local.grammar import Constraint
from backends.local.logits import Processors
from backends.local.request import LocalRequest
from backends.local.sampler import Sampler
from backends.local.toolcalls import ToolCallParser, merge
from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import BackendError


@dataclass
class Choice:
    index: int
    ids: list[int]
    limit: int
    sampler: Sampler
    parser: ToolCallParser | None
    echo: str = ""
    seq_id: int | None = None
    sent: int = 0  # logprob entries sent
    finish: str | None = None
    completion_tokens: int = 0
    reserve: int | None = None  # KV tokens reserved at admission (None: prompt + limit)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    wrapper_tokens: int = 0  # forced tool-call wrapper tokens on top of `limit` (and reserve)


def sampler_for(req: LocalRequest, vocab: int, index: int, ids: list[int],
                constraint: Constraint | None, token_text: Callable[[int], str],
                eos_ids: frozenset[int]) -> Sampler:
    processors = None
    if req.logit_bias or req.repetition_penalty != 1.0 or constraint is not None or req.logprobs is not None:
        processors = Processors(vocab, req.logit_bias, req.repetition_penalty, constraint,
                                req.logprobs, token_text, ids, skip=eos_ids)
    seed = None if req.seed is None else req.seed + index  # each choice its own, repeatable
    try:
        return Sampler(vocab, req.temperature, req.top_p, seed, req.presence_penalty,
                       req.frequency_penalty, req.top_k, req.min_p, processors)
    except ValueError as e:
        raise BackendError(str(e), 400, "invalid_request") from None


Post = Callable[["asyncio.Queue[tuple[int, Event]]", tuple[int, Event]], None]


async def run(ctx: RequestContext, engine: Engine, tok: ChatTokenizer, req: LocalRequest,
              choices: list[Choice], adapter_slot: int, post: Post,
              priority: int = 1, prefix_salt: bytes | None = None
              ) -> AsyncGenerator[Chunk, None]:
    """Submit every choice, then turn the engine's events into chunks until all have ended;
    closing the generator early aborts what is still running. `post` (the backend's Mailbox)
    moves an event from the engine thread onto `events` in this loop, one wake-up per step.
    `prefix_salt`: what cached KV blocks the sequences may share (None: none); the choices
    of one prompt follow its first, sharing its prompt blocks."""
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    eos = frozenset() if req.ignore_eos else tok.eos_token_ids
    prompt_tokens = sum(len(c.ids) for c in choices) // max(1, req.n)
    try:
        for c in choices:
            def emit(ev: Event, i: int = c.index) -> None:
                post(events, (i, ev))
            first = choices[c.index - c.index % req.n]
            try:
                c.seq_id = engine.submit(c.ids, c.limit, c.sampler, tok.detokenizer(c.ids), emit,
                                         stop=list(req.stop), eos_ids=eos, adapter_slot=adapter_slot,
                                         reserve_tokens=c.reserve, priority=priority,
                                         prefix_salt=prefix_salt,
                                         follows=first.seq_id if first is not c else None,
                                         wrapper_tokens=c.wrapper_tokens)
            except EngineClosed as e:
                raise BackendError(str(e), 503, "backend_closed") from None
        for c in choices:
            if c.echo:
                yield Chunk(text=c.echo, index=c.index)
        running = len(choices)
        peak = share = workspace = 0
        queued = 0.0
        held: tuple[int, Event] | None = None  # taken early: another choice's, handled next
        while running:
            i, ev = held if held is not None else await events.get()
            held = None
            while ev.finish_reason is None and ev.error is None and not events.empty():
                j, nxt = events.get_nowait()
                if j != i:
                    held = (j, nxt)
                    break
                nxt.text = ev.text + nxt.text  # arrived together: one chunk for both
                ev = nxt
            c = choices[i]
            if ev.error is not None:
                c.finish = "error"
                status, code = ((503, "backend_closed") if isinstance(ev.error, EngineClosed)
                                else (500, "backend_error"))
                raise BackendError(f"generation failed: {ev.error}", status, code)
            chunk = _delta(c, ev.text, ev.completion_tokens, ev.finish_reason)
            if ev.finish_reason is None:
                if chunk is not None:
                    yield chunk
                continue
            running -= 1
            c.finish = "tool_calls" if c.parser is not None and c.parser.called and \
                ev.finish_reason == "stop" else ev.finish_reason
            c.completion_tokens = ev.completion_tokens
            c.cached_tokens = ev.cached_tokens
            peak += ev.kv_peak_bytes
            share += ev.kv_peak_share_bytes
            workspace = max(workspace, ev.workspace_bytes)
            queued = max(queued, ev.queue_seconds)
            if chunk is not None:
                yield chunk
            if running:
                yield Chunk(index=i, ended=c.finish)
                continue
            ctx.memory.kv_bytes_peak = peak
            ctx.memory.kv_bytes_peak_share = share
            ctx.memory.workspace_bytes = workspace
            ctx.memory.queue_seconds = queued
            completion = sum(x.completion_tokens for x in choices)
            cached = sum(x.cached_tokens for x in choices if x.index % req.n == 0)  # once a prompt
            yield Chunk(index=i, finish_reason=c.finish,
                        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                    cached_tokens=cached))
    finally:
        for c in choices:
            if c.seq_id is not None and c.finish is None:
                engine.abort(c.seq_id)


def _delta(c: Choice, text: str, tokens: int, finish: str | None) -> Chunk | None:
    """The chunk of one event: its text (or tool-call deltas), and the logprob entries of the
    tokens generated up to it. `finish`: the choice's finish reason when it is the last."""
    entries: list[dict[str, Any]] | None = None
    processors = c.sampler.processors
    if processors is not None and processors.top_logprobs is not None:
        entries = processors.entries[c.sent:tokens]
        c.sent += len(entries)
    calls: list[dict[str, Any]] = []
    if c.parser is not None:
        text, calls = c.parser.feed(text)
        if finish is not None:
            rest, more = c.parser.flush(cut=finish == "length")
            text, calls = text + rest, merge(calls + more)
    if not text and not entries and not calls:
        return None
    return Chunk(text=text, index=c.index, logprobs=entries, tool_calls=calls or None)
