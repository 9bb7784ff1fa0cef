"""gateway/responses_api.py: a Responses request as chat, and a chat answer as a Response."""

from __future__ import annotations

import pytest

from gateway.core.context import RequestContext, SamplingParams
from gateway.core.errors import InvalidRequest
from gateway.responses_api import from_chat, to_chat


def test_request_items_become_messages() -> None:
    chat = to_chat({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0.5,
        "reasoning": {"effort": "low"}, "text": {"format": {"type": "json_schema", "name": "s",
                                                            "schema": {"type": "object"}}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"type": "reasoning", "summary": []},
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"},
    })
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    assert chat["max_completion_tokens"] == 9 and chat["reasoning_effort"] == "low"
    assert chat["tools"] == [{"type": "function", "function": {"name": "f",
                                                               "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "s", "schema": {"type": "object"}}}


@pytest.mark.parametrize(("body", "param"), [
    ({"store": True}, "store"), ({"previous_response_id": "r"}, "previous_response_id"),
    ({"conversation": "c"}, "conversation"), ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"type": "computer_call"}]}, "input[0]"),
])
def test_what_chat_cannot_carry_is_a_400(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_chat({"model": "m", "input": "hi", **body})
    assert info.value.param == param


def test_a_chat_answer_as_a_response() -> None:
    ctx = RequestContext(request_id="abc", tenant="t", kind="chat", requested_model="m",
                         target_model="m", backend="b", sampling=SamplingParams(),
                         body={"tools": [{"type": "function", "function": {"name": "f"}}]})
    answer = {"choices": [{"message": {"content": "hello", "tool_calls": [
        {"id": "call_1", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    r = from_chat(ctx, answer)
    assert r["id"] == "resp_abc" and r["status"] == "incomplete"
    assert r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [o["type"] for o in r["output"]] == ["message", "function_call"]
    assert r["output"][1]["call_id"] == "call_1" and r["output"][1]["arguments"] == "{\"a\":1}"
    assert r["usage"]["input_tokens"] == 3 and r["usage"]["total_tokens"] == 5
    assert r["tools"] == [{"type": "function", "name": "f"}]


def _ctx() -> RequestContext:
    return RequestContext(request_id="abc", tenant="t", kind="chat", requested_model="m",
                          target_model="m", backend="b", sampling=SamplingParams(), body={})


@pytest.mark.parametrize(("finish", "status"), [("length", "incomplete"), ("stop", "completed")])
def test_the_item_a_length_limit_cuts_is_incomplete(finish: str, status: str) -> None:
    text = {"choices": [{"message": {"content": "hel"}, "finish_reason": finish}]}
    r = from_chat(_ctx(), text)
    assert r["status"] == status and [o["status"] for o in r["output"]] == [status]
    calls = {"choices": [{"message": {"content": "hi", "tool_calls": [
        {"id": "c0", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c1", "function": {"name": "f", "arguments": "{\"a\":"}}]},
        "finish_reason": finish}]}
    assert [o["status"] for o in from_chat(_ctx(), calls)["output"]] == \
        ["completed", "completed", status]


@pytest.mark.parametrize("calls", [False, True])
def test_a_streamed_item_cut_by_the_length_limit_is_done_incomplete(calls: bool) -> None:
    import json

    from gateway.responses_api import _Stream

    s = _Stream(_ctx())
    s.start()
    s.feed("hel", [])
    if calls:
        s.feed("", [{"index": 0, "id": "c0", "function": {"name": "f", "arguments": "{\"a\":"}}])
    s.finish = "length"
    events = [json.loads(e.split(b"data: ", 1)[1]) for e in s.end()]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["status"] for i in done] == (["completed", "incomplete"] if calls
                                           else ["incomplete"])
    assert events[-1]["type"] == "response.incomplete"
    assert [o["status"] for o in events[-1]["response"]["output"]] == [i["status"] for i in done]
