"""Faithful proxying, against a recording upstream (tests/e2e/recording_upstream.py) behind a
real `gateway serve`: every field a client sends arrives unchanged but for the documented
rewrites (model; stream usage the gateway needs; the tenant's max_output_tokens where the
request named no limit), nothing is injected, and every field the upstream answers reaches
the client, JSON and SSE, for chat, completions, Responses and embeddings."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.recording_upstream import EXTRA, USAGE, RecordingUpstream, stream_of
from tests.server import ACME_SHA, GLOBEX_SHA, running_gateway

ACME = {"authorization": "Bearer sk-demo-acme"}
GLOBEX = {"authorization": "Bearer sk-demo-globex"}  # capped: max_output_tokens 50

MESSAGES: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "Weather?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                            "detail": "low"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "rain"},
    {"role": "user", "content": "And tomorrow?"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather by city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]
# Fields OpenAI, vLLM or a provider know and the gateway does not need: all must arrive.
EXOTIC = {"reasoning_effort": "low", "verbosity": "high", "top_k": 5,
          "chat_template_kwargs": {"enable_thinking": False}, "prompt_cache_key": "k1",
          "safety_identifier": "u-9", "metadata": {"a": "b"}, "store": False,
          "service_tier": "auto", "parallel_tool_calls": False, "logit_bias": {"50": -5},
          "logprobs": True, "top_logprobs": 2, "n": 1, "seed": 3, "user": "ann",
          "max_completion_tokens": 40, "temperature": 0.3, "response_format": {"type": "text"},
          "tools": TOOLS, "tool_choice": "auto", "some_future_field": [1, {"x": None}]}


def config(upstream: str) -> dict[str, Any]:
    return {
        "backends": {
            "up": {"kind": "openai", "url": upstream, "adapter_model": "{model}--{adapter}"},
            "chatonly": {"kind": "openai", "url": upstream, "responses_api": "via_chat",
                         "model": "up-model"},
        },
        "models": [{"name": "big", "backend": "up"}, {"name": "older", "backend": "chatonly"}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["big", "older"],
             "adapters": {"big": "acme-support"}},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["big"],
             "limits": {"max_output_tokens": 50}},
        ],
    }


@pytest.fixture(scope="module")
def up() -> Iterator[RecordingUpstream]:
    with RecordingUpstream().running() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gw(up: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(config(up.url), tmp_path_factory.mktemp("fidelity")) as url:
        yield url


def post(url: str, path: str, body: dict[str, Any], headers: dict[str, str] = ACME) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def sse_data(text: str) -> list[dict[str, Any]]:
    """The JSON of each `data:` event, [DONE] left out."""
    return [json.loads(line[6:]) for line in text.split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


def renamed(event: dict[str, Any], model: str) -> dict[str, Any]:
    return {**event, "model": model}


def test_chat_json_every_field_there_and_back(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "big", "messages": MESSAGES, **EXOTIC}
    r = post(gw, "/chat/completions", body)
    assert r.status_code == 200, r.text
    sent = up.last("/chat/completions").body
    assert sent == {**body, "model": "big--acme-support"}  # only the model (the adapter)
    assert r.json() == renamed(up.chat(sent), "big")  # the whole answer, ids untouched
    assert r.headers["x-request-id"] != r.json()["id"]  # the gateway's own id is the header


def test_nothing_is_injected(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
    post(gw, "/chat/completions", body).raise_for_status()
    assert up.last("/chat/completions").body == {**body, "model": "big--acme-support"}
    post(gw, "/completions", {"model": "big", "prompt": [[1, 2, 3], [4]]}).raise_for_status()
    assert up.last("/completions").body == {"model": "big--acme-support", "prompt": [[1, 2, 3], [4]]}


@pytest.mark.parametrize("client_asks_usage", [False, True])
def test_chat_stream_events_pass_through(gw: str, up: RecordingUpstream,
                                         client_asks_usage: bool) -> None:
    body: dict[str, Any] = {"model": "big", "messages": MESSAGES[:2], "tools": TOOLS,
                            "stream": True, "logprobs": True}
    if client_asks_usage:
        body["stream_options"] = {"include_usage": True}
    r = post(gw, "/chat/completions", body)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    sent = up.last("/chat/completions").body
    # the one stream rewrite: usage asked for the gateway's accounting
    assert sent == {**body, "model": "big--acme-support",
                    "stream_options": {"include_usage": True}}
    upstream_events = stream_of(up.chat(sent), usage=True)
    got = sse_data(r.text)
    if client_asks_usage:
        assert got == [renamed(e, "big") for e in upstream_events]
    else:  # the usage event and usage: null the client did not ask for are not shown
        want = [renamed({k: v for k, v in e.items() if k != "usage"}, "big")
                for e in upstream_events if e["choices"]]
        assert got == want
    deltas = [c["delta"] for e in got for c in e["choices"]]
    assert any("tool_calls" in d for d in deltas) and any("reasoning_content" in d for d in deltas)
    last = [e for e in got if e["choices"]][-1]["choices"][0]
    assert last["logprobs"] == up.chat(sent)["choices"][0]["logprobs"]


def test_completions_json_and_stream(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "big", "prompt": "Once", "echo": True, "best_of": 2, "suffix": "end"}
    r = post(gw, "/completions", body)
    assert up.last("/completions").body == {**body, "model": "big--acme-support"}
    assert r.json() == renamed(up.completion(body), "big")
    r = post(gw, "/completions", {**body, "stream": True})
    assert sse_data(r.text) == [renamed({k: v for k, v in e.items() if k != "usage"}, "big")
                                for e in stream_of(up.completion(body), usage=True) if e["choices"]]


def test_tenant_output_cap_is_the_one_documented_rewrite(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
    r = post(gw, "/chat/completions", body, GLOBEX)
    assert r.status_code == 200 and r.headers["x-gateway-max-output-tokens"] == "50"
    assert up.last("/chat/completions").body == {**body, "max_completion_tokens": 50}
    before = len(up.requests)
    for field in ("max_tokens", "max_completion_tokens"):
        r = post(gw, "/chat/completions", {**body, field: 51}, GLOBEX)
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    r = post(gw, "/chat/completions", {**body, "max_tokens": 50}, GLOBEX)
    assert r.status_code == 200 and "x-gateway-max-output-tokens" not in r.headers
    assert up.last("/chat/completions").body == {**body, "max_tokens": 50}  # as sent
    assert len(up.requests) == before + 1  # the refused ones never went upstream


def test_responses_native_pass_through(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "big", "input": "hi", "store": True, "previous_response_id": "resp_prev_1",
            "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object",
                                                                        "properties": {}}}]}
    r = post(gw, "/responses", body)
    assert r.status_code == 200, r.text
    assert up.last("/responses").body == {**body, "model": "big--acme-support"}
    answer = r.json()
    assert answer["id"] == "resp_up_42" and answer["model"] == "big"
    assert answer["x_upstream_extra"] == EXTRA["x_upstream_extra"]
    r = post(gw, "/responses", {**body, "stream": True})
    kinds = [line[7:] for line in r.text.split("\n") if line.startswith("event: ")]
    assert kinds == ["response.created", "response.output_item.added",
                     "response.output_item.done", "response.completed"]
    events = sse_data(r.text)
    assert events[-1]["response"]["id"] == "resp_up_42" and events[-1]["response"]["model"] == "big"
    assert "[DONE]" not in r.text  # a Responses stream has none


def test_responses_via_chat_translate_and_store_nothing(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "older", "instructions": "Be brief.", "input": "hi", "max_output_tokens": 30,
            "tools": [{"type": "function", "name": "f",
                       "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}],
            "tool_choice": {"type": "function", "name": "f"}}
    r = post(gw, "/responses", body)
    assert r.status_code == 200, r.text
    sent = up.last("/chat/completions").body
    assert sent["model"] == "up-model" and sent["max_completion_tokens"] == 30
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    out = r.json()["output"]
    assert out[0]["type"] == "function_call" and out[0]["name"] == "f"
    assert json.loads(out[0]["arguments"]) == {"q": "x"}
    before = len(up.requests)
    for field, value in (("store", True), ("previous_response_id", "resp_1")):
        r = post(gw, "/responses", {**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert len(up.requests) == before


def test_embeddings_pass_through_and_count(gw: str, up: RecordingUpstream) -> None:
    body = {"model": "big", "input": ["a", "b"], "dimensions": 3, "encoding_format": "float"}
    r = post(gw, "/embeddings", body)
    assert r.status_code == 200, r.text
    assert up.last("/embeddings").body == {**body, "model": "big--acme-support"}
    assert r.json()["data"][0]["embedding"] == [0.5, -0.25, 0.125] and r.json()["model"] == "big"
    metrics = httpx.get(gw.removesuffix("/v1") + "/metrics", timeout=10).text
    line = next(m for m in metrics.splitlines()
                if m.startswith("gateway_prompt_tokens_total") and 'tenant="acme"' in m)
    assert float(line.rsplit(" ", 1)[1]) >= 5


def test_upstream_answer_fields_survive_the_sdk(gw: str, up: RecordingUpstream) -> None:
    import openai

    client = openai.OpenAI(base_url=gw, api_key="sk-demo-acme", max_retries=0)
    reply = client.chat.completions.create(model="big", messages=copy.deepcopy(MESSAGES[:2]),
                                           tools=TOOLS)  # type: ignore[arg-type]
    call = reply.choices[0].message.tool_calls
    assert call is not None and call[0].id == "call_up_1" and reply.id == "chatcmpl-up-123"
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 2
    assert reply.system_fingerprint == "fp_up" and reply.choices[0].finish_reason == "tool_calls"
    assert reply.usage.total_tokens == USAGE["total_tokens"]
