"""Tool calls read back out of generated text: the markup never reaches the client, whole or
cut (by max_tokens) anywhere, in one piece or streamed a character at a time; on the demo
model, a call cut by max_tokens ends `length` with arguments that are a prefix of its JSON,
and the tokens the grammar forces are appended without a step each (jump-forward)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import xgrammar as xgr

from backends.local.backend import LocalBackend, LocalConfig
from backends.local.grammar import CALL_TAIL, TAG, call_head, tools_grammar
from backends.local.toolcalls import ToolCallParser
from gateway.core.context import Chunk, RequestContext, SamplingParams

ARGS = '{"city":"Paris","when":{"day":"mon","hour":9}}'
CALL = call_head("get_weather") + ARGS + CALL_TAIL
MARKUP = ("<tool_call>", "</tool_call>", "<tool", "</t", '"arguments"', '"name"')
WEATHER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}


def parse(pieces: list[str], cut: bool) -> tuple[str, list[dict[str, Any]]]:
    parser = ToolCallParser()
    text, calls = "", []
    for piece in pieces:
        t, c = parser.feed(piece)
        text, calls = text + t, calls + c
    t, c = parser.flush(cut=cut)
    return text + t, calls + c


def joined(calls: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    for d in calls:
        name, args = out.get(d["index"], ("", ""))
        out[d["index"]] = (
            name + (d["function"].get("name") or ""),
            args + (d["function"].get("arguments") or ""),
        )
    return out


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_call_cut_anywhere_never_shows_markup(step: int) -> None:
    for end in range(len(CALL) + 1):
        out = CALL[:end]
        text, calls = parse(
            [out[i : i + step] for i in range(0, len(out), step)], cut=end < len(CALL)
        )
        assert text == ""
        got = joined(calls)
        head_done = end >= len(call_head("get_weather"))
        assert list(got) == ([0] if head_done else [])
        if head_done:
            name, args = got[0]
            assert name == "get_weather"
            assert ARGS.startswith(args), (end, args)  # a prefix of the JSON, nothing more
            assert not any(m in args for m in ("</", "<tool"))
            if end >= len(call_head("get_weather")) + len(ARGS):
                assert args == ARGS  # complete arguments stay complete (no wrapper brace)


def test_text_before_a_call_and_a_partial_tag_at_the_end() -> None:
    text, calls = parse(["Sure. ", CALL], cut=False)
    assert text == "Sure. " and joined(calls) == {0: ("get_weather", ARGS)}
    assert parse(["a < b and <tool"], cut=False) == ("a < b and <tool", [])  # said, not cut
    assert parse(["a < b and <tool"], cut=True) == ("a < b and ", [])  # a call opening, cut


def test_an_argument_string_holding_markup_characters_is_kept() -> None:
    args = '{"q":"a}</t'
    _, calls = parse([call_head("f") + args], cut=True)
    assert joined(calls)[0][1] == args  # inside an unfinished string: the arguments' own


# ---- on the demo model ------------------------------------------------------------------


def ctx(body: dict[str, Any], max_tokens: int) -> RequestContext:
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": max_tokens,
        **body,
    }
    return RequestContext(
        request_id="r",
        tenant="t",
        kind="chat",
        requested_model="demo",
        target_model="demo",
        backend="local",
        sampling=SamplingParams(max_tokens=max_tokens),
        body=body,
        messages=body["messages"],
    )


async def run(b: LocalBackend, c: RequestContext) -> tuple[list[Chunk], Chunk]:
    chunks = [chunk async for chunk in b.generate(c)]
    return chunks, chunks[-1]


@pytest.fixture(scope="module")
def demo_backend(demo_model: Path) -> Any:
    loop = asyncio.new_event_loop()
    b = LocalBackend("local", LocalConfig(model=str(demo_model), kv_cache_bytes=32 * 2**20))
    loop.run_until_complete(b.start())
    yield b, loop
    loop.run_until_complete(b.aclose())
    loop.close()


def test_calls_cut_by_max_tokens_end_length_with_a_prefix_of_their_json(demo_backend: Any) -> None:
    b, loop = demo_backend
    grammar = tools_grammar([TOOL], True, False, False)
    compiled = b._grammars.compiler.compile_structural_tag(grammar[len(TAG) :])
    ended = set()
    for max_tokens in (1, 2, 5, 9, 14, 20, 40):
        for seed in (1, 2):
            body = {"tools": [TOOL], "tool_choice": "required", "seed": seed}
            chunks, last = loop.run_until_complete(run(b, ctx(body, max_tokens)))
            assert "".join(c.text for c in chunks) == ""  # no content, no markup
            calls = [d for c in chunks for d in c.tool_calls or ()]
            ((name, args),) = joined(calls).values()
            assert name == "get_weather"
            for d in calls:  # no streamed delta carries markup
                assert not any(m in d["function"].get("arguments", "") for m in MARKUP)
            # the arguments are a prefix of a call the grammar allows
            assert xgr.GrammarMatcher(compiled).accept_string(call_head(name) + args), args
            ended.add(last.finish_reason)
            if last.finish_reason == "tool_calls":
                assert json.loads(args)["unit"] in ("c", "f")
            else:
                assert last.finish_reason == "length"
                # max_tokens bounds the arguments: the wrapper's forced tokens come on top
                wrapper = b._grammars.wrapper_tokens([TOOL])
                assert last.usage.completion_tokens <= max_tokens + wrapper
    assert ended == {"length", "tool_calls"}


def test_forced_tokens_are_not_sampled(demo_backend: Any) -> None:
    b, loop = demo_backend
    engine = b._engine
    body = {
        "tools": [TOOL],
        "seed": 3,
        "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    steps, answers = {}, {}
    try:
        for jump in (False, True):
            engine.jump_forward = jump
            before, forced = engine.steps, engine.tokens_forced
            chunks, last = loop.run_until_complete(run(b, ctx(body, 200)))
            steps[jump] = engine.steps - before
            assert last.finish_reason == "tool_calls"
            answers[jump] = joined([d for c in chunks for d in c.tool_calls or ()])[0]
            assert (engine.tokens_forced > forced) is jump
    finally:
        engine.jump_forward = True
    assert answers[True][0] == answers[False][0] == "get_weather"
    for _, args in answers.values():
        assert json.loads(args)["unit"] in ("c", "f")
    # the wrapper's length: the tokens of the call (as the model reads it whole) that are
    # wrapper only (the tag, name and `"arguments":`, the closing), none of the arguments
    head, args = call_head("get_weather"), answers[False][1]
    enc = b._grammars.tokenizer.encode(head + args + CALL_TAIL, add_special_tokens=False)
    wrapper = sum(1 for a, z in enc.offsets if z <= len(head) or a >= len(head) + len(args))
    assert wrapper >= 15 and steps[False] - steps[True] >= wrapper, (steps, wrapper)


def test_a_closing_tag_inside_an_argument_string_does_not_end_the_call() -> None:
    args = '{"q":"a}</tool_call> b\\"}","n":[1,{"m":"]"}]}'
    for step in (1, 4, 1000):
        out = call_head("f") + args + CALL_TAIL + "<tool_call>"
        text, calls = parse([out[i : i + step] for i in range(0, len(out), step)], cut=True)
        assert text == "" and joined(calls) == {0: ("f", args)}
        assert json.loads(args)["q"] == 'a}</tool_call> b"}'


def test_one_delta_per_call_in_each_piece() -> None:
    # A call's head and the first of its arguments read in one piece (the grammar's forced
    # tokens arrive together) are one delta, as OpenAI streams them: clients such as
    # instructor's create_partial read only `tool_calls[0]` of a chunk.
    two = CALL + CALL.replace("get_weather", "get_time")
    for step in (1, 3, 7, 40, 1000):
        for end in range(len(two) + 1):
            parser, seen = ToolCallParser(), []
            pieces = [two[:end][i : i + step] for i in range(0, end, step)]
            results = [parser.feed(p)[1] for p in pieces] + [parser.flush(cut=end < len(two))[1]]
            for deltas in results:
                assert len({d["index"] for d in deltas}) == len(deltas), deltas
                seen += deltas
            for d in seen:
                if "id" in d:  # each call's first delta: its id, type and name
                    assert d["type"] == "function" and d["function"]["name"]
            if end == len(two):
                assert joined(seen) == {0: ("get_weather", ARGS), 1: ("get_time", ARGS)}


def test_a_streamed_call_is_one_delta_a_chunk(demo_backend: Any) -> None:
    b, loop = demo_backend
    body = {
        "tools": [TOOL],
        "seed": 1,
        "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    chunks, last = loop.run_until_complete(run(b, ctx(body, 60)))
    assert last.finish_reason == "tool_calls"
    deltas = [c.tool_calls for c in chunks if c.tool_calls]
    assert all(len(d) == 1 for d in deltas), deltas
    first = deltas[0][0]  # the head with the forced start of the arguments
    assert first["id"] and first["function"]["name"] == "get_weather"
    assert first["function"]["arguments"].startswith('{"')
    args = "".join(d[0]["function"]["arguments"] for d in deltas)
    assert json.loads(args)["unit"] in ("c", "f")
