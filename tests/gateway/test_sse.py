"""gateway/sse.py: server-sent events and whole answers built from backend chunks, as OpenAI
sends them: one id, the role first, one finish_reason per choice, the usage event when asked,
[DONE] last (never after an error); passthrough events renamed; the chunks always closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson
import pytest

from gateway.core.context import Chunk, RequestContext, SamplingParams, Usage
from gateway.core.errors import RateLimited
from gateway.shutdown import Drain
from gateway.sse import DONE, collect, passthrough_event, stream_events

USAGE = Usage(prompt_tokens=4, completion_tokens=3)


def ctx(
    kind: str = "chat",
    *,
    n: int = 1,
    stream: bool = True,
    include_usage: bool = False,
    target: str = "demo",
) -> RequestContext:
    return RequestContext(
        request_id="r1",
        tenant="acme",
        kind=kind,
        requested_model="demo",
        target_model=target,
        backend="local",
        sampling=SamplingParams(n=n),
        stream=stream,
        include_usage=include_usage,
        created=1700000000.5,
    )


class Source:
    """The backend's chunks as an async generator that records whether it was closed."""

    def __init__(self, steps: Sequence[Chunk | BaseException]) -> None:
        self.steps = list(steps)
        self.closed = False
        self.pulled = 0

    async def run(self) -> AsyncGenerator[Chunk, None]:
        try:
            for step in self.steps:
                self.pulled += 1
                if isinstance(step, BaseException):
                    raise step
                yield step
        finally:
            self.closed = True


async def _events(
    c: RequestContext, steps: Sequence[Chunk | BaseException], drain: Drain | None = None
) -> tuple[list[bytes], Source]:
    """What stream_events yields, taking the first chunk first as the handler does."""
    source = Source(steps)
    chunks = source.run()
    try:
        first: Chunk | None = await anext(chunks)
    except StopAsyncIteration:
        first = None
    out = [e async for e in stream_events(c, chunks, first, drain)]
    return out, source


def events(
    c: RequestContext, steps: Sequence[Chunk | BaseException], drain: Drain | None = None
) -> tuple[list[bytes], Source]:
    return asyncio.run(_events(c, steps, drain))


def payloads(writes: list[bytes]) -> list[Any]:
    """Each event's JSON ([DONE] as the string)."""
    out: list[Any] = []
    for frame in b"".join(writes).split(b"\n\n"):
        if frame:
            assert frame.startswith(b"data: "), frame
            data = frame[6:]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def test_a_chat_stream_as_openai_sends_it() -> None:
    writes, source = events(
        ctx(include_usage=True),
        [Chunk(text="Hel"), Chunk(text="lo"), Chunk(finish_reason="stop", usage=USAGE)],
    )
    got = payloads(writes)
    assert got[-1] == "[DONE]" and writes[-1].endswith(DONE)
    body = got[:-1]
    assert {e["id"] for e in body} == {"chatcmpl-r1"}
    assert {e["object"] for e in body} == {"chat.completion.chunk"}
    assert {e["created"] for e in body} == {1700000000} and {e["model"] for e in body} == {"demo"}
    assert [e["choices"][0]["delta"] for e in body[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [e["choices"][0]["finish_reason"] for e in body[:-1]] == [None, None, None, "stop"]
    assert body[-1] == {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "demo",
        "choices": [],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }
    assert all(e["usage"] is None for e in body[:-1])
    assert source.closed


def test_without_include_usage_no_event_has_usage() -> None:
    writes, _ = events(ctx(), [Chunk(text="a"), Chunk(finish_reason="length", usage=USAGE)])
    got = payloads(writes)
    assert got[-1] == "[DONE]"
    assert all("usage" not in e for e in got[:-1])
    assert got[-2]["choices"][0]["finish_reason"] == "length"


def test_the_text_frames_match_a_plain_encoding() -> None:
    """The pre-encoded text events are byte for byte what encoding the whole event gives."""
    text = 'quote " backslash \\ newline \n emoji \U0001f600 nul \x00'
    writes, _ = events(ctx(include_usage=True), [Chunk(text=text), Chunk(finish_reason="stop")])
    frames = b"".join(writes).split(b"\n\n")
    expected = {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "demo",
        "choices": [
            {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    }
    assert frames[1] == b"data: " + orjson.dumps(expected)


def test_chunks_that_arrived_together_are_one_write() -> None:
    writes, _ = events(
        ctx(),
        [
            Chunk(text="a", more=True),
            Chunk(text="b", more=True),
            Chunk(text="c"),
            Chunk(text="d"),
            Chunk(finish_reason="stop"),
        ],
    )
    # role+a+b+c together (the backend held them together), then d, then the end and [DONE]
    assert [w.count(b"data: ") for w in writes] == [4, 1, 2]


def test_n_choices_each_get_a_role_and_their_own_end() -> None:
    writes, _ = events(
        ctx(n=2),
        [
            Chunk(text="x", index=0),
            Chunk(text="y", index=1),
            Chunk(index=1, ended="length"),
            Chunk(text="z", index=0),
            Chunk(index=0, finish_reason="stop"),
        ],
    )
    got = payloads(writes)[:-1]
    roles = [e["choices"][0]["index"] for e in got if e["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    ends = [
        (e["choices"][0]["index"], e["choices"][0]["finish_reason"])
        for e in got
        if e["choices"][0]["finish_reason"]
    ]
    assert ends == [(1, "length"), (0, "stop")]
    texts: dict[int, str] = {}
    for e in got:
        c = e["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert texts == {0: "xz", 1: "y"}


def test_a_completion_stream_has_text_offsets_and_no_role() -> None:
    lp = [
        {"token": "ab", "logprob": -0.5, "top_logprobs": [{"token": "ab", "logprob": -0.5}]},
        {"token": "c", "logprob": -1.0},
    ]
    writes, _ = events(
        ctx("completion"),
        [
            Chunk(text="ab", logprobs=lp[:1]),
            Chunk(text="c", logprobs=lp[1:]),
            Chunk(finish_reason="stop"),
        ],
    )
    got = payloads(writes)[:-1]
    assert {e["object"] for e in got} == {"text_completion"}
    assert {e["id"] for e in got} == {"cmpl-r1"}
    assert [e["choices"][0]["text"] for e in got] == ["ab", "c", ""]
    assert got[0]["choices"][0]["logprobs"] == {
        "tokens": ["ab"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"ab": -0.5}],
        "text_offset": [0],
    }
    assert got[1]["choices"][0]["logprobs"]["text_offset"] == [2]


def test_an_error_mid_stream_is_an_error_event_and_no_done() -> None:
    writes, source = events(ctx(), [Chunk(text="a"), RateLimited("slow down", retry_after=1)])
    got = payloads(writes)
    assert "[DONE]" not in got
    assert got[-1] == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert [e["choices"][0]["delta"].get("content") for e in got[:-1]] == ["", "a"]
    assert source.closed


def test_an_unexpected_failure_mid_stream_says_nothing_of_it() -> None:
    writes, source = events(ctx(), [Chunk(text="a"), RuntimeError("internal sk-secret")])
    got = payloads(writes)
    assert "[DONE]" not in got and "sk-secret" not in b"".join(writes).decode()
    assert got[-1]["error"]["type"] == "api_error"
    assert source.closed


def test_a_stream_that_ends_without_a_finish_still_ends_with_done() -> None:
    writes, _ = events(ctx(), [Chunk(text="a")])
    assert payloads(writes)[-1] == "[DONE]"
    writes, _ = events(ctx(), [])  # nothing at all: the role, then [DONE]
    assert payloads(writes)[-1] == "[DONE]" and len(payloads(writes)) == 2


def test_a_shutdown_past_its_grace_ends_the_stream_with_an_error() -> None:
    async def go() -> tuple[list[bytes], Source]:
        drain = Drain(0.0)
        drain.begin()  # the grace is over at once
        return await _events(
            ctx(), [Chunk(text="a"), Chunk(text="b"), Chunk(finish_reason="stop")], drain
        )

    writes, source = asyncio.run(go())
    got = payloads(writes)
    assert got[-1]["error"]["code"] == "shutting_down" and "[DONE]" not in got
    assert source.closed and source.pulled == 1  # nothing pulled past the deadline


def test_the_chunks_are_closed_when_the_client_stops_reading() -> None:
    async def go() -> Source:
        source = Source([Chunk(text="a"), Chunk(text="b"), Chunk(finish_reason="stop")])
        chunks = source.run()
        first = await anext(chunks)
        gen = stream_events(ctx(), chunks, first)
        await anext(gen)
        await gen.aclose()
        return source

    assert asyncio.run(go()).closed


# ---- passthrough (remote kinds) -----------------------------------------------------------


def test_passthrough_events_are_renamed_and_the_injected_usage_held_back() -> None:
    c = ctx(target="tier-b")  # stream, no include_usage: the gateway injected the usage ask
    assert c.usage_injected
    writes, _ = events(
        c,
        [
            Chunk(
                event={
                    "id": "up-1",
                    "model": "gpt-x",
                    "choices": [{"delta": {"content": "a"}}],
                    "usage": None,
                }
            ),
            Chunk(
                event={"id": "up-1", "model": "gpt-x", "choices": [], "usage": {"total_tokens": 3}},
                usage=USAGE,
            ),
            Chunk(
                event={
                    "id": "up-1",
                    "model": "gpt-x",
                    "choices": [{"delta": {}, "finish_reason": "stop"}],
                },
                finish_reason="stop",
            ),
        ],
    )
    got = payloads(writes)
    assert got[-1] == "[DONE]"
    assert [e["model"] for e in got[:-1]] == ["tier-b", "tier-b"]  # the usage event dropped
    assert "usage" not in got[0]  # usage: null the client did not ask for is removed
    assert got[0]["id"] == "up-1"  # otherwise as the upstream sent it


def test_a_passthrough_usage_event_asked_for_is_kept() -> None:
    event = {"id": "u", "model": "m", "choices": [], "usage": {"total_tokens": 3}}
    c = ctx(include_usage=True)
    assert (
        passthrough_event(c, dict(event))
        == b"data: " + orjson.dumps({**event, "model": "demo"}) + b"\n\n"
    )


def test_a_responses_passthrough_event_is_named_and_has_no_done() -> None:
    c = ctx("responses")
    writes, _ = events(
        c,
        [
            Chunk(event={"type": "response.output_text.delta", "delta": "a"}),
            Chunk(
                event={"type": "response.completed", "response": {"model": "up", "id": "x"}},
                finish_reason="stop",
            ),
        ],
    )
    frames = [f for f in b"".join(writes).split(b"\n\n") if f]
    assert frames[0].startswith(b"event: response.output_text.delta\ndata: ")
    last = json.loads(frames[1].split(b"\ndata: ", 1)[1])
    assert last["response"]["model"] == "demo"
    assert b"[DONE]" not in b"".join(writes)


# ---- collect: the whole answer ------------------------------------------------------------


def _collect(c: RequestContext, steps: Sequence[Chunk]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        source = Source(steps)
        return await collect(c, source.run())

    return asyncio.run(go())


def test_collect_builds_the_chat_answer() -> None:
    got = _collect(
        ctx(stream=False),
        [Chunk(text="Hel"), Chunk(text="lo"), Chunk(finish_reason="length", usage=USAGE)],
    )
    assert got == {
        "id": "chatcmpl-r1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "demo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }


def test_collect_merges_tool_call_deltas_and_n_choices() -> None:
    got = _collect(
        ctx(stream=False, n=2),
        [
            Chunk(
                index=0,
                tool_calls=[
                    {"index": 0, "id": "call_1", "function": {"name": "get_", "arguments": '{"a"'}}
                ],
            ),
            Chunk(index=1, text="plain"),
            Chunk(
                index=0,
                tool_calls=[{"index": 0, "function": {"name": "weather", "arguments": ": 1}"}}],
            ),
            Chunk(index=1, ended="stop"),
            Chunk(index=0, finish_reason="tool_calls", usage=USAGE),
        ],
    )
    first, second = got["choices"]
    assert first["message"]["content"] is None and first["finish_reason"] == "tool_calls"
    assert first["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"a": 1}'},
        }
    ]
    assert second["message"]["content"] == "plain" and second["finish_reason"] == "stop"


def test_collect_of_a_completion_with_logprobs() -> None:
    lp = [{"token": "a", "logprob": -0.1}, {"token": "bc", "logprob": -0.2}]
    got = _collect(
        ctx("completion", stream=False),
        [
            Chunk(text="a", logprobs=lp[:1]),
            Chunk(text="bc", logprobs=lp[1:]),
            Chunk(finish_reason="stop"),
        ],
    )
    choice = got["choices"][0]
    assert got["object"] == "text_completion" and choice["text"] == "abc"
    assert choice["logprobs"]["text_offset"] == [0, 1]
    assert got["usage"]["completion_tokens"] == 0  # none reported: none counted


def test_collect_of_a_passthrough_answer_only_renames() -> None:
    answer = {"id": "up", "object": "chat.completion", "model": "gpt-x", "choices": []}
    got = _collect(ctx(stream=False, target="tier-b"), [Chunk(event=dict(answer))])
    assert got == {**answer, "model": "tier-b"}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_collect_of_nothing_is_one_empty_choice(kind: str) -> None:
    got = _collect(ctx(kind, stream=False), [])
    assert len(got["choices"]) == 1 and got["choices"][0]["finish_reason"] == "stop"
