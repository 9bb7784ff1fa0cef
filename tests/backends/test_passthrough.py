"""Every remote kind sends the client's body as sent: the `openai` kind (its wire is tested in
tests/e2e/test_fidelity.py), `vllm` (the same body, vLLM's name for the model) and `litellm`
(the body as litellm's arguments, its own controls added), for every route."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from backends.litellm import LiteLLMBackend, LiteLLMConfig
from backends.openai import OpenAIBackend, OpenAIConfig
from backends.vllm import VLLMBackend, VLLMConfig
from gateway.core.context import RequestContext, SamplingParams

BODIES: dict[str, dict[str, Any]] = {
    "chat": {"model": "big", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
        "n": 3, "logit_bias": {"5": 1}, "seed": 1, "stop": ["a", "b", "c", "d", "e"],
        "logprobs": True, "top_logprobs": 3, "top_k": 2, "min_p": 0.1, "store": True,
        "reasoning_effort": "high", "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required", "response_format": {"type": "json_object"}, "user": "u"},
    "completion": {"model": "big", "prompt": [[1, 2], [3]], "echo": True, "logprobs": 2, "n": 2},
    "responses": {"model": "big", "input": "hi", "store": True, "previous_response_id": "r1"},
    "embeddings": {"model": "big", "input": ["a"], "dimensions": 8},
}


def ctx(kind: str, stream: bool = False) -> RequestContext:
    body = copy.deepcopy(BODIES[kind])
    if stream:
        body["stream"] = True
    return RequestContext(request_id="r", tenant="t", kind=kind, requested_model="big",
                          target_model="big", backend="b", sampling=SamplingParams(),
                          stream=stream, body=body, messages=body.get("messages"),
                          adapter="acme")


@pytest.mark.parametrize("kind", list(BODIES))
def test_every_field_goes_upstream_as_sent(kind: str) -> None:
    c = ctx(kind)
    want = {**BODIES[kind], "model": "served:acme"}
    openai_kind = OpenAIBackend("o", OpenAIConfig(url="http://127.0.0.1:9/v1", model="served",
                                                  adapter_model="{model}:{adapter}"))
    assert openai_kind._body(c) == want
    vllm = VLLMBackend("v", VLLMConfig(url="http://127.0.0.1:9/v1", model="served"))
    assert vllm._body(c) == {**want, "model": "acme"}  # vLLM serves each LoRA by its name
    lite = LiteLLMBackend("l", LiteLLMConfig(model="openai/served", api_base="http://x",
                                             adapter_model="openai/{model}:{adapter}"))
    kw = lite._kwargs(c)
    assert {k: v for k, v in kw.items() if k in want} == {**want, "model": "openai/served:acme"}
    assert set(kw) - set(want) == {"timeout", "num_retries", "extra_headers", "api_base", "api_key"}


def test_a_stream_asks_usage_only_where_the_client_did_not() -> None:
    kind = OpenAIBackend("o", OpenAIConfig(url="http://127.0.0.1:9/v1"))
    c = ctx("chat", stream=True)
    assert kind._body(c)["stream_options"] == {"include_usage": True}
    c.body["stream_options"] = {"include_usage": False, "continuous_usage_stats": True}
    assert kind._body(c)["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "stream_options" not in kind._body(ctx("responses", stream=True))


def test_drop_fields_removes_what_the_operator_listed() -> None:
    kind = OpenAIBackend("o", OpenAIConfig(url="http://127.0.0.1:9/v1",
                                           drop_fields=("reasoning_effort", "top_k")))
    sent = kind._body(ctx("chat"))
    assert "reasoning_effort" not in sent and "top_k" not in sent and sent["min_p"] == 0.1
