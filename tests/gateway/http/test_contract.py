"""The steps both writers share (gateway/http/contract.py): which headers go out, the body
bound, and how a stream's events end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from gateway.core.errors import GatewayError
from gateway.http.contract import check_body_size, clean_headers, sse_frames
from gateway.sse import DONE


def test_headers_with_control_characters_are_left_out() -> None:
    kept = clean_headers({"x-a": "1", "x-b": "evil\r\nset-cookie: x", "x-c": "nul\x00", "x-d": "ok"})
    assert kept == [("x-a", "1"), ("x-d", "ok")]


def test_body_size_bound() -> None:
    check_body_size(10, 10)
    with pytest.raises(GatewayError) as err:
        check_body_size(11, 10)
    assert err.value.status == 413


class Source:
    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.closed = False

    async def gen(self) -> AsyncGenerator[bytes, None]:
        try:
            for e in self.events:
                yield e
        finally:
            self.closed = True


def frames_of(events: list[bytes], stop_after: int | None = None) -> tuple[list[tuple[bytes, bool]], bool]:
    src = Source(events)

    async def go() -> list[tuple[bytes, bool]]:
        out = []
        async with contextlib.aclosing(sse_frames(src.gen())) as frames:
            async for frame in frames:
                out.append(frame)
                if stop_after is not None and len(out) == stop_after:
                    break
        return out

    return asyncio.run(go()), src.closed


def test_a_stream_ends_at_done_and_nothing_after_it_is_sent() -> None:
    frames, closed = frames_of([b"data: 1\n\n", DONE, b"data: late\n\n"])
    assert frames == [(b"data: 1\n\n", False), (DONE, True)] and closed


def test_a_stream_without_done_gets_an_empty_last_frame() -> None:
    frames, closed = frames_of([b"data: 1\n\n", b'data: {"error": {}}\n\n'])
    assert frames[-1] == (b"", True) and [last for _, last in frames] == [False, False, True]
    assert closed


def test_the_source_is_closed_when_the_writer_stops_early() -> None:
    frames, closed = frames_of([b"data: 1\n\n", b"data: 2\n\n"], stop_after=1)
    assert len(frames) == 1 and closed
