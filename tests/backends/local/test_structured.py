"""Grammar-constrained decoding on the demo model, in process: 200 requests with bounded
schemas, mixed with tool calls, free requests and adapters in the same batches, all end with
`stop` and validate; the grammar's bounds (size, compile errors, the cache)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from backends.local.backend import LocalBackend, LocalConfig
from gateway.core.context import Chunk, RequestContext, SamplingParams
from gateway.core.errors import InvalidRequest

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "additionalProperties": False, "required": ["name", "status"],
     "properties": {"name": {"type": "string", "maxLength": 12},
                    "status": {"enum": ["open", "closed", "pending"]}}},
    {"type": "object", "additionalProperties": False, "required": ["tags", "count"],
     "properties": {"tags": {"type": "array", "maxItems": 3,
                             "items": {"type": "string", "maxLength": 6}},
                    "count": {"type": "integer", "minimum": 0, "maximum": 99}}},
    {"type": "object", "additionalProperties": False, "required": ["ok", "level"],
     "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3]},
                    "note": {"type": "string", "maxLength": 8}}},
]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMAS[0]}}
PROMPTS = ["Describe the order.", "Give me the ticket.", "Status please", "Hello"]


def ctx(i: int, body: dict[str, Any], adapter: str | None) -> RequestContext:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "seed": i,
            "max_tokens": 300, **body}
    return RequestContext(request_id=f"r{i}", tenant="t", kind="chat", requested_model="demo",
                          target_model="demo", backend="local",
                          sampling=SamplingParams(max_tokens=300), body=body,
                          messages=body["messages"], adapter=adapter)


async def run(b: LocalBackend, c: RequestContext) -> tuple[str, list[dict[str, Any]], Chunk]:
    text, calls, last = [], [], Chunk()
    async for chunk in b.generate(c):
        text.append(chunk.text)
        calls += chunk.tool_calls or []
        last = chunk
    return "".join(text), calls, last


def arguments(calls: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    for d in calls:
        name, args = out.get(d["index"], ("", ""))
        out[d["index"]] = (name + (d["function"].get("name") or ""),
                           args + (d["function"].get("arguments") or ""))
    return out


@pytest.fixture(scope="module")
def demo_backend(demo_model: Path) -> Any:
    loop = asyncio.new_event_loop()
    b = LocalBackend("local", LocalConfig(model=str(demo_model), kv_cache_bytes=64 * 2**20,
                                          adapters_dir=str(demo_model / "adapters"),
                                          max_batch_size=32))
    loop.run_until_complete(b.start())
    yield b, loop
    loop.run_until_complete(b.aclose())
    loop.close()


def test_200_constrained_requests_all_stop_and_validate(demo_backend: Any) -> None:
    b, loop = demo_backend
    adapters = [None, "acme-support", "globex-legal"]
    cases: list[tuple[str, Any, RequestContext]] = []
    for i in range(240):  # 200 constrained (schemas and tool calls), 40 free, interleaved
        adapter = adapters[i % 3]
        if i % 6 == 5:
            cases.append(("free", None, ctx(i, {"temperature": 1.0}, adapter)))
        elif i % 6 == 4:
            # one call (parallel calls are a grammar without a bound: `plus`)
            body = {"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False}
            cases.append(("tool", SCHEMAS[0], ctx(i, body, adapter)))
        else:
            schema = SCHEMAS[i % 3]
            fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                          "strict": True}}
            cases.append(("json", schema, ctx(i, {"response_format": fmt}, adapter)))

    async def all_of() -> list[tuple[str, list[dict[str, Any]], Chunk]]:
        return list(await asyncio.gather(*(run(b, c) for _, _, c in cases)))

    results = loop.run_until_complete(all_of())
    constrained = 0
    for (kind, schema, _), (text, calls, last) in zip(cases, results, strict=True):
        if kind == "free":
            assert last.finish_reason in ("stop", "length")
            continue
        constrained += 1
        if kind == "json":
            assert last.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), schema)
        else:
            assert last.finish_reason == "tool_calls" and text == ""
            (name, args), = arguments(calls).values()
            assert name == "lookup"
            jsonschema.validate(json.loads(args), schema)
    assert constrained == 200
    assert b._grammars is not None and b._grammars.compiled == 4  # 3 schemas + 1 tool grammar


def test_json_object_and_parallel_and_named_tool_calls(demo_backend: Any) -> None:
    b, loop = demo_backend
    other = {"type": "function", "function": {"name": "other", "parameters": SCHEMAS[2]}}
    text, _, last = loop.run_until_complete(run(b, ctx(1, {"response_format": {"type": "json_object"}},
                                                        None)))
    assert last.finish_reason == "stop" and isinstance(json.loads(text), dict)
    _, calls, last = loop.run_until_complete(run(b, ctx(2, {
        "tools": [TOOL, other], "tool_choice": {"type": "function", "function": {"name": "other"}}},
        None)))
    assert last.finish_reason == "tool_calls"
    got = arguments(calls)
    assert [n for n, _ in got.values()] == ["other"]  # named: one call of that one
    jsonschema.validate(json.loads(got[0][1]), SCHEMAS[2])
    ids = [d["id"] for d in calls if "id" in d]
    assert len(ids) == 1 and ids[0].startswith("call_")


def test_grammar_bounds(demo_backend: Any) -> None:
    b, loop = demo_backend
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 60}
                                             for i in range(1200)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": huge}}
    with pytest.raises(InvalidRequest) as info:
        loop.run_until_complete(run(b, ctx(1, {"response_format": fmt}, None)))
    assert info.value.param == "response_format" and info.value.code == "schema_too_large"
    bad = {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}
    with pytest.raises(InvalidRequest) as info:
        loop.run_until_complete(run(b, ctx(1, {"response_format": bad}, None)))
    assert info.value.code == "invalid_schema" and "nowhere" in info.value.message
    assert "/project" not in info.value.message  # xgrammar's source path is not the client's


def test_a_grammar_compiling_too_long_is_a_400(demo_model: Path) -> None:
    from tokenizers import Tokenizer

    from backends.local.grammar import GrammarLimits, Grammars, json_grammar

    grammars = Grammars(Tokenizer.from_file(str(demo_model / "tokenizer.json")), 2048, [3],
                        GrammarLimits(compile_timeout_s=1e-6))
    wide = {"type": "object", "properties": {f"p{i}": {"enum": [f"v{j}" for j in range(20)]}
                                             for i in range(200)}}
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(grammars.constraint(json_grammar(wide), "response_format"))
    assert info.value.code == "schema_too_complex" and grammars.compiled == 0
