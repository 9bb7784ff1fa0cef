"""gateway/validation.py's request bounds (server.request_bounds), Unicode and field checks:
each problem a 400 naming its param, on the parsed body, without recursion."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from gateway.core.errors import InvalidRequest
from gateway.settings import ConfigError, RequestBounds, parse_settings
from gateway.validation import (
    check_bounds,
    check_metadata,
    check_nesting_and_unicode,
    check_responses,
    check_schema_bytes,
    parse_body,
    schemas,
)

BOUNDS = RequestBounds()
HI = [{"role": "user", "content": "hi"}]


def rejected(body: dict[str, Any] | bytes, kind: str = "chat",
             bounds: RequestBounds = BOUNDS) -> InvalidRequest:
    parsed = parse_body(body) if isinstance(body, bytes) else body
    with pytest.raises(InvalidRequest) as info:
        check_bounds(parsed, kind, bounds)
    assert info.value.status == 400
    return info.value


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_a_plain_body_passes() -> None:
    check_bounds({"model": "m", "messages": HI, "stop": ["a"] * 16,
                  "logit_bias": {"1": 2}, "metadata": {"k": "\U0001f600"}}, "chat", BOUNDS)


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model":"m\\ud800"}', "model"),
    (b'{"model":"m","messages":[{"role":"user","content":"\\udc00"}]}', "messages[0].content"),
    (b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"\\ud800x"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model":"m","x":[1,[2,["ok","\\udbff"]]]}', "x[1][1][1]"),
    (b'{"model":"m","metadata":{"\\ud800":"v"}}', "metadata"),
    (b'{"\\ud800":1}', None),
    # an integer past 64 bits sends the walk down the slow path: the surrogate still found
    (b'{"seed":123456789012345678901234567890,"user":"\\ud800"}', "user"),
])
def test_a_lone_surrogate_is_named(raw: bytes, param: str | None) -> None:
    err = rejected(raw)
    assert (err.code, err.param) == ("invalid_unicode", param)
    json.dumps(err.body(), ensure_ascii=False).encode()  # the error itself encodes


def test_a_surrogate_pair_is_one_valid_character() -> None:
    check_bounds(parse_body(b'{"model":"m","user":"\\ud83d\\ude00"}'), "chat", BOUNDS)


def test_nesting_is_bounded_and_named() -> None:
    deep = {"model": "m", "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": parse_body(nested(70))}}}
    err = rejected(deep)
    assert (err.code, err.param) == ("nesting_too_deep", "response_format.json_schema.schema")
    arrays = parse_body(b'{"x":' + b"[" * 64 + b"]" * 64 + b"}")
    assert rejected(arrays).param == "x[0]"
    check_nesting_and_unicode(parse_body(b'{"x":' + b"[" * 63 + b"]" * 63 + b"}"), 64)
    tools = {"tools": [{"type": "function", "function": {"parameters": parse_body(nested(80))}}]}
    assert rejected(tools).param == "tools[0].function.parameters"


def test_the_walk_does_not_recurse() -> None:
    """A body nested far past the interpreter's recursion limit (built without recursion) is
    refused, not a RecursionError."""
    body: dict[str, Any] = {}
    inner = body
    for _ in range(sys.getrecursionlimit() * 3):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(InvalidRequest) as info:
        check_nesting_and_unicode(body, 64)
    assert info.value.code == "nesting_too_deep" and info.value.param == "a.a.a"


def test_a_body_too_deep_to_parse_is_named_by_its_field() -> None:
    raw = b'{"model":"m","note":"[[[{","response_format":' + nested(3000) + b"}"
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw)
    assert (info.value.code, info.value.param) == ("nesting_too_deep", "response_format")
    with pytest.raises(InvalidRequest) as info:
        parse_body(b"[" * 5000 + b"]" * 5000)
    assert info.value.code == "nesting_too_deep" and info.value.param is None


@pytest.mark.parametrize(("body", "kind", "param"), [
    ({"messages": HI * 2049}, "chat", "messages"),
    ({"input": HI * 2049}, "responses", "input"),
    ({"stop": ["s"] * 17}, "chat", "stop"),
    ({"stop": ["s"] * 17}, "completion", "stop"),
])
def test_lists_are_bounded(body: dict[str, Any], kind: str, param: str) -> None:
    err = rejected(body, kind)
    assert (err.code, err.param) == ("array_above_max_length", param)


def test_a_configured_bound_applies() -> None:
    tight = RequestBounds(max_messages=2, max_stop=1, max_logit_bias=1)
    assert rejected({"messages": HI * 3}, bounds=tight).param == "messages"
    assert rejected({"stop": ["a", "b"]}, bounds=tight).param == "stop"
    assert rejected({"logit_bias": {"1": 1, "2": 1}}, bounds=tight).param == "logit_bias"
    check_bounds({"messages": HI * 2049}, "embeddings", BOUNDS)  # not a chat: not counted


@pytest.mark.parametrize("bias", [
    {"9" * 5000: 1}, {"\u00b2": 1}, {"-1": 1}, {"1.5": 1}, {"12345678901": 1},
    {str(i): 0 for i in range(1025)},
])
def test_logit_bias_keys_and_entries(bias: dict[str, int]) -> None:
    assert rejected({"logit_bias": bias}).param == "logit_bias"


def test_schemas_are_summed_and_the_one_past_the_bound_is_named() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}
    size = len(json.dumps(schema, separators=(",", ":")))
    body = {
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}},
                  {"type": "function", "name": "g", "parameters": schema}],
        "text": {"format": {"type": "json_schema", "schema": schema}},
    }
    assert [p for p, _ in schemas(body)] == [
        "response_format.json_schema.schema", "text.format.schema",
        "tools[0].function.parameters", "tools[1].parameters"]
    check_schema_bytes(body, 4 * size)
    with pytest.raises(InvalidRequest) as info:
        check_schema_bytes(body, 2 * size + 1)
    assert (info.value.code, info.value.param) == ("schema_too_large", "tools[0].function.parameters")
    big = {"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "enum": [1 << 70] * 10000}}}}  # integers past 64 bits: measured all the same
    with pytest.raises(InvalidRequest) as info:
        check_schema_bytes(big, 64 * 1024)
    assert info.value.code == "schema_too_large"


@pytest.mark.parametrize(("metadata", "param"), [
    ("m", "metadata"), ({"k": 5}, "metadata.k"), ({"k": "v" * 513}, "metadata.k"),
    ({"k" * 65: "v"}, "metadata"), ({f"k{i}": "v" for i in range(17)}, "metadata"),
])
def test_metadata_as_openai_bounds_it(metadata: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_metadata({"metadata": metadata})
    assert info.value.param == param


def test_metadata_within_the_bounds() -> None:
    check_metadata({"metadata": {f"k{i:02d}" + "x" * 60: "v" * 512 for i in range(16)}})
    check_metadata({"metadata": None})
    check_metadata({})


@pytest.mark.parametrize(("body", "param"), [
    ({"instructions": 5}, "instructions"), ({"instructions": {"a": 1}}, "instructions"),
    ({"text": "json"}, "text"), ({"text": {"format": "json"}}, "text.format"),
])
def test_responses_fields_are_typed(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_responses(body)
    assert info.value.param == param


def test_responses_fields_well_typed() -> None:
    check_responses({"instructions": "x", "text": {"format": {"type": "text"}}})
    check_responses({"instructions": [{"role": "system", "content": "x"}], "text": {}})


def test_request_bounds_in_the_config() -> None:
    base = {"backends": {"up": {"kind": "openai", "url": "http://127.0.0.1:9/v1"}},
            "models": [{"name": "m", "backend": "up"}]}
    got = parse_settings({**base, "server": {"request_bounds": {
        "max_schema_bytes": "128KiB", "max_stop": 4}}}).server.request_bounds
    assert got == RequestBounds(max_schema_bytes=128 * 1024, max_stop=4)
    assert parse_settings(base).server.request_bounds == RequestBounds()
    for bad in ({"max_nesting": 4}, {"max_nesting": 1000}, {"max_messages": 0},
                {"max_stop": "x"}, {"max_depth": 3}):
        with pytest.raises(ConfigError, match=r"server\.request_bounds"):
            parse_settings({**base, "server": {"request_bounds": bad}})
