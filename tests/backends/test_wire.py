"""The `openai` kind's reading of an upstream's server-sent events: the events on the wire
(backends/sse_reader.py EventReader: line ends, BOM, multi-line data) and their chunks
(backends/wire.py SSEState: a block's events parsed together, and the careful path for
anything odd, with the same chunks and the same errors in the same order). Every event is
passed through as the upstream sent it (Chunk.event); the last chunk adds the finish_reason
and usage the gateway accounts with."""

from __future__ import annotations

import json

import pytest

from backends.sse_reader import EventReader
from backends.wire import SSEState
from gateway.core.context import Chunk, Usage
from gateway.core.errors import BackendError


def ev(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode()


def delta_event(text: str, finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def delta(text: str, finish: str | None = None) -> bytes:
    return ev(delta_event(text, finish))


def passed(*events: dict[str, object]) -> list[Chunk]:
    return [Chunk(event=e) for e in events]


USAGE_EVENT = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
USAGE = ev(USAGE_EVENT)


def events(*lines: bytes) -> list[bytes]:
    """The data of the events these lines make, each line ended by LF."""
    return EventReader().feed(b"".join(line + b"\n" for line in lines))


def test_a_whole_stream_in_one_block() -> None:
    state = SSEState()
    out = state.feed(events(delta(""), b"", delta("Hel"), b"", b": a comment", delta("lo", "length"),
                            b"", USAGE, b"", b"data: [DONE]", b"", delta("after done"), b""))
    assert out == [*passed(delta_event(""), delta_event("Hel"), delta_event("lo", "length"),
                           USAGE_EVENT),
                   Chunk(finish_reason="length", usage=Usage(5, 2))]
    assert state.done and state.error is None


def test_blocks_one_at_a_time_and_completions() -> None:
    state = SSEState()
    text = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ("a", "b")]
    assert state.feed(events(ev(text[0]), b"")) == passed(text[0])
    assert state.feed(events(ev(text[1]), b"", USAGE, b"")) == passed(text[1], USAGE_EVENT)
    assert state.feed(events(b"data: [DONE]", b"")) == [
        Chunk(finish_reason="stop", usage=Usage(5, 2))]


@pytest.mark.parametrize("bad", [b"data: {not json", b"data: [1, 2]",
                                 ev({"error": {"message": "overloaded"}})])
def test_odd_event_after_good_ones_raises_after_them(bad: bytes) -> None:
    state = SSEState()
    out = state.feed(events(delta("one"), b"", delta("two"), b"", bad, b"", delta("three"), b""))
    assert out == passed(delta_event("one"), delta_event("two"))
    assert isinstance(state.error, BackendError) and not state.done


@pytest.mark.parametrize("bad", [b"data: {not json", ev({"error": {"message": "overloaded"}})])
def test_odd_first_event_raises_at_once(bad: bytes) -> None:
    with pytest.raises(BackendError) as info:
        SSEState().feed(events(bad, b"", delta("x"), b""))
    assert info.value.code in ("upstream_malformed", "upstream_error")


# ---- the wire: EventReader ------------------------------------------------------------------

PAYLOAD = b'{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}'


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_ends_lf_crlf_and_cr_alone(eol: bytes) -> None:
    wire = b"data: " + PAYLOAD + eol + eol + b": keep-alive" + eol + b"data: [DONE]" + eol + eol
    assert EventReader().feed(wire) == [PAYLOAD, b"[DONE]"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_any_split_of_the_bytes_gives_the_same_events(eol: bytes) -> None:
    wire = (b"\xef\xbb\xbfdata: {\"a\":" + eol + b"data: 1}" + eol + eol + b"event: x" + eol
            + b"data:[DONE]" + eol + eol)
    for cut in range(len(wire) + 1):
        for cut2 in range(cut, len(wire) + 1):
            reader = EventReader()
            got = reader.feed(wire[:cut]) + reader.feed(wire[cut:cut2]) + reader.feed(wire[cut2:])
            got += reader.close()
            assert got == [b'{"a":\n1}', b"[DONE]"], (cut, cut2)


def test_multi_line_data_is_joined_with_lf() -> None:
    wire = b'data: {"choices":\ndata: [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
    state = SSEState()
    assert state.feed(EventReader().feed(wire)) == passed(
        {"choices": [{"index": 0, "text": "x", "finish_reason": None}]})


def test_a_responses_stream_ends_at_its_last_event_with_its_usage() -> None:
    state = SSEState()
    done = {"type": "response.completed", "response": {"id": "resp_1", "status": "completed",
            "usage": {"input_tokens": 7, "output_tokens": 3}}}
    out = state.feed(events(ev({"type": "response.output_text.delta", "delta": "x"}), b"",
                            ev(done), b""))
    assert out == passed({"type": "response.output_text.delta", "delta": "x"}, done)
    assert state.end() == Chunk(finish_reason="stop", usage=Usage(7, 3))


def test_a_leading_bom_is_dropped_not_the_first_event() -> None:
    reader = EventReader()
    assert reader.feed(b"\xef\xbb") == []
    assert reader.feed(b"\xbfdata: " + PAYLOAD + b"\n\n") == [PAYLOAD]
    assert EventReader().feed(b"\xef\xbb\xbfdata: x\n\n") == [b"x"]
    assert EventReader().feed(b"data: \xef\xbb\xbfx\n\n") == [b"\xef\xbb\xbfx"]  # only the stream's first


def test_the_end_of_the_stream_completes_an_unfinished_event() -> None:
    reader = EventReader()
    assert reader.feed(b"data: [DONE]") == []
    assert reader.close() == [b"[DONE]"]
    reader = EventReader()
    assert reader.feed(b"data: x\r") == []
    assert reader.close() == [b"x"]


def test_a_stream_asked_whole_is_merged_into_the_whole_answer() -> None:
    from backends.merge import merge

    env = {"id": "c1", "created": 5, "model": "m", "system_fingerprint": "fp", "x_new": 1}
    events = [
        {**env, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**env, "choices": [{"index": 0, "delta": {"reasoning_content": "hm"},
                             "finish_reason": None}]},
        {**env, "choices": [{"index": 0, "delta": {"content": "Hel"},
                             "logprobs": {"content": [{"token": "Hel", "logprob": -1.0}]}}]},
        {**env, "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": '{"a"'}}]},
            "logprobs": {"content": [{"token": "lo", "logprob": -2.0}]}}]},
        {**env, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]},
        {**env, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    whole = merge(events, chat=True)
    assert whole == {
        **env, "object": "chat.completion",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "logprobs": {"content": [{"token": "Hel", "logprob": -1.0},
                                              {"token": "lo", "logprob": -2.0}]},
                     "message": {"role": "assistant", "content": "Hello",
                                 "reasoning_content": "hm",
                                 "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "f",
                                                              "arguments": '{"a":1}'}}]}}],
    }
