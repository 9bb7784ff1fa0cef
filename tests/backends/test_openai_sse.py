"""The `openai` kind's reading of an upstream's server-sent events (backends/openai.py
_SSEState): a block's events parsed together, and the careful path for anything odd, with
the same chunks and the same errors in the same order."""

from __future__ import annotations

import json

import pytest

from backends.openai import _SSEState
from gateway.context import Chunk, Usage
from gateway.errors import BackendError


def ev(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode()


def delta(text: str, finish: str | None = None) -> bytes:
    return ev({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


USAGE = ev({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})


def test_a_whole_stream_in_one_block() -> None:
    state = _SSEState()
    lines = [delta(""), b"", delta("Hel"), b"", b": a comment", delta("lo", "length"), b"",
             USAGE, b"", b"data: [DONE]", b"", delta("after done")]
    out = state.feed(lines, chat=True)
    assert out == [Chunk(text="Hel"), Chunk(text="lo"),
                   Chunk(finish_reason="length", usage=Usage(5, 2))]
    assert state.done and state.error is None


def test_blocks_one_at_a_time_and_completions() -> None:
    state = _SSEState()
    text = [ev({"choices": [{"index": 0, "text": t, "finish_reason": None}]}) for t in ("a", "b")]
    assert state.feed([text[0]], chat=False) == [Chunk(text="a")]
    assert state.feed([text[1], USAGE], chat=False) == [Chunk(text="b")]
    assert state.feed([b"data: [DONE]"], chat=False) == [
        Chunk(finish_reason="stop", usage=Usage(5, 2))]


@pytest.mark.parametrize("bad", [b"data: {not json", b"data: [1, 2]",
                                 ev({"error": {"message": "overloaded"}})])
def test_odd_event_after_good_ones_raises_after_them(bad: bytes) -> None:
    state = _SSEState()
    out = state.feed([delta("one"), delta("two"), bad, delta("three")], chat=True)
    assert out == [Chunk(text="one"), Chunk(text="two")]
    assert isinstance(state.error, BackendError) and not state.done


@pytest.mark.parametrize("bad", [b"data: {not json", ev({"error": {"message": "overloaded"}})])
def test_odd_first_event_raises_at_once(bad: bytes) -> None:
    with pytest.raises(BackendError) as info:
        _SSEState().feed([bad, delta("x")], chat=True)
    assert info.value.code in ("upstream_malformed", "upstream_error")
