"""gateway/validation.py's request bounds (server.request_bounds), Unicode and field checks:
each problem a 400 naming its param, on the parsed body, without recursion."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.core.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.settings import ConfigError, RequestBounds, parse_settings
from gateway.validation import (
    check_body_headers,
    check_bounds,
    check_metadata,
    check_nesting_and_unicode,
    check_responses,
    check_schema_bytes,
    check_user,
    messages,
    model_name,
    output_limit,
    parse_body,
    prompt,
    sampling,
    schemas,
    stream_flags,
)
from tests.gateway.fakes import DEMO_VOCAB, ScriptedBackend, running

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


# ---- the body and the fields the gateway itself reads (the handler's order) ---------------


@pytest.mark.parametrize("ctype", ["application/json", "Application/JSON; charset=utf-8",
                                   "application/vnd.api+json", None])
def test_json_media_types_pass(ctype: str | None) -> None:
    check_body_headers(ctype, "10", 100)


@pytest.mark.parametrize("ctype", ["text/plain", "", "multipart/form-data; boundary=x",
                                   "application/jsonx"])
def test_other_media_types_are_415(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        check_body_headers(ctype, None, 100)
    assert (info.value.status, info.value.code) == (415, "unsupported_media_type")


def test_a_declared_length_is_held_to_the_limit() -> None:
    check_body_headers("application/json", "100", 100)
    check_body_headers("application/json", "not-a-number", 100)  # the read's limit decides
    with pytest.raises(PayloadTooLarge) as info:
        check_body_headers("application/json", "101", 100)
    assert (info.value.status, info.value.code) == (413, "request_too_large")


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
    (b'"text"', "JSON object"), (b'{"model": "\xff\xfe"}', "not valid UTF-8"),
])
def test_bodies_that_are_not_a_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw)
    assert info.value.code == "invalid_json" and message in info.value.message


def test_what_only_the_reference_parser_reads() -> None:
    """Integers past 64 bits stay integers and NaN parses (the field checks then name it)."""
    body = parse_body(b'{"seed": 123456789012345678901234567890, "temperature": NaN}')
    assert body["seed"] == 123456789012345678901234567890
    assert body["temperature"] != body["temperature"]
    assert parse_body('{"model": "m"}'.encode("utf-16")) == {"model": "m"}


@pytest.mark.parametrize(("body", "code"), [
    ({}, "missing_required_parameter"), ({"model": 5}, "invalid_type"),
    ({"model": ""}, "invalid_type"),
])
def test_the_model_is_a_non_empty_string(body: dict[str, Any], code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        model_name(body)
    assert (info.value.param, info.value.code) == ("model", code)


@pytest.mark.parametrize(("body", "flags"), [
    ({}, (False, False)), ({"stream": True}, (True, False)),
    ({"stream": True, "stream_options": {"include_usage": True}}, (True, True)),
    ({"stream": True, "stream_options": {}}, (True, False)),
    ({"stream": False, "stream_options": None}, (False, False)),
])
def test_stream_flags(body: dict[str, Any], flags: tuple[bool, bool]) -> None:
    assert stream_flags(body) == flags


@pytest.mark.parametrize(("body", "param"), [
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
])
def test_bad_stream_flags(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        stream_flags(body)
    assert info.value.param == param


@pytest.mark.parametrize(("body", "kind", "expected"), [
    ({"max_tokens": 5}, "chat", ("max_tokens", 5)),
    ({"max_completion_tokens": 7, "max_tokens": 5}, "chat", ("max_completion_tokens", 7)),
    ({}, "chat", ("max_completion_tokens", None)),
    ({"max_tokens": 3}, "completion", ("max_tokens", 3)),
    ({"max_output_tokens": 9, "max_tokens": 1}, "responses", ("max_output_tokens", 9)),
    ({"max_tokens": 3}, "embeddings", ("", None)),
])
def test_the_output_limit_field(body: dict[str, Any], kind: str,
                                expected: tuple[str, int | None]) -> None:
    assert output_limit(body, kind) == expected


@pytest.mark.parametrize("value", [0, -1, (1 << 31) + 1, 1.5, "ten", True])
def test_a_bad_output_limit_names_it(value: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        output_limit({"max_tokens": value}, "chat")
    assert info.value.param == "max_tokens"


def test_sampling_reads_what_telemetry_needs_and_leaves_the_rest() -> None:
    s = sampling({"max_tokens": 8, "n": 2, "temperature": 0.5, "top_p": "x", "seed": True,
                  "stop": ["a", "", 3, "b"], "ignore_eos": True}, "chat")
    assert (s.max_tokens, s.n, s.temperature, s.top_p, s.seed) == (8, 2, 0.5, 1.0, None)
    assert s.stop == ["a", "b"] and s.ignore_eos is True
    assert sampling({"stop": "x", "n": 5}, "responses").n == 1  # n is chat's and completions'
    assert sampling({"stop": "x"}, "chat").stop == ["x"]
    with pytest.raises(InvalidRequest) as info:
        sampling({"n": 129}, "chat")
    assert info.value.param == "n"


@pytest.mark.parametrize(("raw", "param", "code"), [
    (None, "messages", "missing_required_parameter"), ("hi", "messages", "invalid_type"),
    ([], "messages", "invalid_value"), ([HI[0], "x"], "messages[1]", "invalid_type"),
    ([{"role": "wizard"}], "messages[0].role", "invalid_value"),
    ([{"content": "x"}], "messages[0].role", "invalid_value"),
])
def test_messages_are_a_list_of_known_roles(raw: Any, param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        messages({} if raw is None else {"messages": raw})
    assert (info.value.param, info.value.code) == (param, code)


def test_every_role_openai_knows_passes() -> None:
    sent = [{"role": r, "content": "x"} for r in
            ("system", "developer", "user", "assistant", "tool", "function")]
    assert messages({"messages": sent}) is sent


@pytest.mark.parametrize("value", ["text", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_the_four_prompt_forms(value: Any) -> None:
    assert prompt({"prompt": value}) == value


@pytest.mark.parametrize("value", [None, [], [1, "a"], [[]], [[1], "a"], [-1], [True], 5,
                                   [1 << 31]])
def test_other_prompts_are_400(value: Any) -> None:
    body = {} if value is None else {"input": value}
    with pytest.raises(InvalidRequest) as info:
        prompt(body, "input")
    assert info.value.param == "input"


def test_user_is_a_string() -> None:
    check_user({"user": "u"})
    check_user({"user": None})
    with pytest.raises(InvalidRequest) as info:
        check_user({"user": 42})
    assert (info.value.param, info.value.code) == ("user", "invalid_type")


# ---- field by field through the handler, moved from the e2e suites -----------------------
# The e2e gateway serves the demo model on the local engine, whose field checks are
# backends/local/request.py: the scripted backend reads the body with the same function,
# where LocalBackend does (counting and generating), over the demo model's vocabulary.

CHAT = {"model": "demo", "messages": HI}
FIELD_CASES: list[tuple[dict[str, Any], str]] = [
    # from tests/e2e/test_api.py test_invalid_fields_are_400_naming_the_param
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": "hello"}, "messages"),
    ({"stop": ["s"] * 65}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": 5}, "model"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
                    ],
                }
            ]
        },
        "messages[0].content[0]",
    ),
    ({"store": True}, "store"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    # from tests/e2e/reliability/test_bad_input.py test_negative_and_absurd_numbers_are_400
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": -1e-9}, "temperature"),
    ({"top_p": 1e300}, "top_p"),
    ({"seed": 2**70}, "seed"),
    ({"presence_penalty": -1e308}, "presence_penalty"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"frequency_penalty": "NaN"}, "frequency_penalty"),
    ({"user": 42}, "user"),
    ({"stop": [1, 2]}, "stop"),
]


@pytest.mark.parametrize(("fields", "param"), FIELD_CASES)
def test_invalid_fields_are_400_naming_the_param(
    tmp_path: Path, fields: dict[str, Any], param: str
) -> None:
    backend = ScriptedBackend(vocab_size=DEMO_VOCAB)

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call({**CHAT, **fields})
            assert out.status == 400, out.body
            err = out.error()
            assert (err["param"], err["type"]) == (param, "invalid_request_error")
            assert backend.opened == 0  # refused before any generation
            assert gw.reserved == 0
            [record] = gw.usage_records()
            assert record["status"] == 400

    asyncio.run(go())


def test_the_engine_field_reader_serves_a_plain_request(tmp_path: Path) -> None:
    """The field cases above fail for their field, not for the reader: a plain request with
    every common field well set passes it."""
    backend = ScriptedBackend(vocab_size=DEMO_VOCAB)

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call(
                {
                    **CHAT,
                    "max_tokens": 8,
                    "temperature": 0.5,
                    "top_p": 0.9,
                    "seed": 7,
                    "stop": ["x"],
                    "logit_bias": {"5": 1},
                    "user": "u1",
                    "n": 1,
                }
            )
            assert out.status == 200, out.body

    asyncio.run(go())


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_are_400(tmp_path: Path, literal: bytes) -> None:
    """(Moved from tests/e2e/reliability/test_bad_input.py.)"""
    backend = ScriptedBackend(vocab_size=DEMO_VOCAB)

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call(
                raw=b'{"model": "demo", "messages": [{"role": "user", '
                b'"content": "hi"}], "temperature": ' + literal + b"}"
            )
            assert out.status == 400
            assert out.error()["param"] == "temperature"

    asyncio.run(go())
