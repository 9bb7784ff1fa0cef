"""The `litellm` kind (marker `litellm`; `make test-litellm`): a gateway running under
.venv-litellm whose tier is litellm's OpenAI-compatible provider pointed at a local gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.server import ACME_SHA, running_gateway

pytestmark = pytest.mark.litellm

ROOT = Path(__file__).resolve().parents[3]
LITELLM_PY = ROOT / ".venv-litellm" / "bin" / "python"
PROMPT = [{"role": "user", "content": "Can I change my delivery address?"}]


def litellm_config(upstream: str) -> dict[str, Any]:
    return {
        "backends": {"hosted": {"kind": "litellm", "model": "openai/demo", "api_base": upstream,
                                "api_key_env": "UPSTREAM_KEY",
                                "adapter_model": "openai/{model}:{adapter}", "timeout": 60}},
        "models": [{"name": "overflow", "backend": "hosted"}],
        "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["overflow"],
                     "adapters": {"overflow": "acme-support"}}],
    }


@pytest.fixture(scope="module")
def via_litellm(demo_gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not LITELLM_PY.exists():
        pytest.fail("the litellm venv is missing: run `make litellm-venv` (make test-litellm does)")
    with running_gateway(litellm_config(demo_gateway), tmp_path_factory.mktemp("litellm"),
                         env={"UPSTREAM_KEY": "sk-demo-acme"}, python=str(LITELLM_PY)) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-demo-acme", max_retries=0, timeout=60)


def test_answers_equal_the_upstream(via_litellm: str, demo_gateway: str) -> None:
    kw: dict[str, Any] = {"messages": PROMPT, "temperature": 0, "max_tokens": 20}
    direct = sdk(demo_gateway).chat.completions.create(model="demo", **kw)  # acme-support
    r = sdk(via_litellm).chat.completions.with_raw_response.create(model="overflow", **kw)
    via = r.parse()
    assert r.headers["x-gateway-adapter"] == "acme-support"
    assert via.model == "overflow"
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage is not None and direct.usage is not None
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    ckw: dict[str, Any] = {"prompt": "Delivery takes", "temperature": 0, "max_tokens": 8}
    assert (sdk(via_litellm).completions.create(model="overflow", **ckw).choices[0].text
            == sdk(demo_gateway).completions.create(model="demo", **ckw).choices[0].text)


def test_streaming_through_litellm(via_litellm: str, demo_gateway: str) -> None:
    kw: dict[str, Any] = {"messages": PROMPT, "temperature": 0, "max_tokens": 20}
    direct = sdk(demo_gateway).chat.completions.create(model="demo", **kw)
    parts = list(sdk(via_litellm).chat.completions.create(
        model="overflow", stream=True, stream_options={"include_usage": True}, **kw))
    chunks = [p.choices[0].delta.content or "" for p in parts if p.choices]
    assert len([c for c in chunks if c]) > 1  # streamed in pieces, not one blob
    assert "".join(chunks) == direct.choices[0].message.content
    assert parts[-1].usage is not None and direct.usage is not None
    assert parts[-1].usage.completion_tokens == direct.usage.completion_tokens


def test_upstream_client_errors_keep_their_status(via_litellm: str) -> None:
    with pytest.raises(openai.BadRequestError):
        sdk(via_litellm).chat.completions.create(
            model="overflow", messages=[{"role": "user", "content": "hours " * 3000}], max_tokens=8)


# ---- fidelity: what litellm carries through to an upstream that serves it --------

def test_tools_structured_outputs_and_extensions_pass_through_litellm(via_litellm: str) -> None:
    import json

    client = sdk(via_litellm)
    tool = {"type": "function", "function": {"name": "track", "parameters": {
        "type": "object", "required": ["order"], "additionalProperties": False,
        "properties": {"order": {"type": "string", "maxLength": 8}}}}}
    r = client.chat.completions.create(model="overflow", messages=PROMPT, tools=[tool],  # type: ignore[list-item]
                                       tool_choice="required", max_tokens=80)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "track"  # type: ignore[union-attr]
    assert len(json.loads(calls[0].function.arguments)["order"]) <= 8  # type: ignore[union-attr]
    schema = {"type": "object", "required": ["ok"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}}}
    r = client.chat.completions.create(model="overflow", messages=PROMPT, max_tokens=40,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "s", "schema": schema, "strict": True}})
    assert isinstance(json.loads(r.choices[0].message.content or "")["ok"], bool)
    # an extension the upstream serves (top_k 1: greedy at any temperature) reaches it
    kw: dict[str, Any] = {"messages": PROMPT, "max_tokens": 12}
    greedy = client.chat.completions.create(model="overflow", temperature=0, **kw)
    top1 = client.chat.completions.create(model="overflow", temperature=1.5, seed=3,
                                          extra_body={"top_k": 1}, **kw)
    assert top1.choices[0].message.content == greedy.choices[0].message.content


def test_responses_over_chat_through_litellm(via_litellm: str) -> None:
    r = sdk(via_litellm).responses.create(model="overflow", input="Hello!", max_output_tokens=12,
                                          temperature=0)
    assert r.output_text and r.model == "overflow" and r.usage is not None
