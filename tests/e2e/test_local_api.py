"""The local engine serves the rest of the API, through a real `gateway serve` on the
demo model: sampling fields that change generation, fields accepted and recorded, completions
with token ids, lists and echo, many stop strings, images refused, Responses over chat,
embeddings refused, the tenant output cap, CORS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import demo_config, running_gateway

ACME = {"authorization": "Bearer sk-demo-acme"}
HI = [{"role": "user", "content": "How do I get a refund?"}]


@pytest.fixture(scope="module")
def gw(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = demo_config(demo_model)
    cfg["server"]["cors_origins"] = ["https://app.example"]
    cfg["tenants"][1]["limits"] = {"max_output_tokens": 6}  # globex
    with running_gateway(cfg, tmp_path_factory.mktemp("local-api")) as url:
        yield url


def chat(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json={"model": "demo", "messages": HI, **body},
                      headers=ACME, timeout=120)


def text(r: httpx.Response, i: int = 0) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][i]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def test_logit_bias_top_k_min_p_and_repetition_change_generation(gw: str) -> None:
    base = chat(gw, temperature=0, max_tokens=6)
    first = base.json()["choices"][0]["logprobs"]
    assert first is None
    lp = chat(gw, temperature=0, max_tokens=6, logprobs=True, top_logprobs=1).json()
    token = lp["choices"][0]["logprobs"]["content"][0]
    assert token["top_logprobs"][0]["token"] == token["token"]  # greedy: the top one
    # the greedy first token, banned: another first token
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(__file__).resolve().parents[2] / "models/demo/tokenizer.json"))
    banned = tok.encode(token["token"], add_special_tokens=False).ids[0]
    biased = chat(gw, temperature=0, max_tokens=6, logit_bias={str(banned): -100})
    assert text(biased) != text(base)
    # top_k 1 and min_p 1 keep only the argmax: any temperature and seed is greedy
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert text(chat(gw, temperature=1.5, seed=7, max_tokens=6, **extra)) == text(base)
    rep = chat(gw, temperature=0, max_tokens=24, repetition_penalty=2.0)
    assert rep.status_code == 200


def test_recorded_fields_are_accepted(gw: str) -> None:
    r = chat(gw, max_tokens=4, user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
             prompt_cache_key="p", safety_identifier="s", parallel_tool_calls=True,
             chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200, r.text


def test_n_with_a_seed_is_repeatable_and_counted(gw: str) -> None:
    a = chat(gw, n=3, seed=11, temperature=1.0, max_tokens=8).json()
    b = chat(gw, n=3, seed=11, temperature=1.0, max_tokens=8).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in a["choices"]] == [
        c["message"]["content"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] <= 3 * 8
    stream = httpx.post(f"{gw}/chat/completions", headers=ACME, timeout=120, json={
        "model": "demo", "messages": HI, "n": 3, "seed": 11, "temperature": 1.0,
        "max_tokens": 8, "stream": True})
    parts: dict[int, str] = {}
    finishes = 0
    for line in stream.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                parts[choice["index"]] = parts.get(choice["index"], "") + (
                    choice["delta"].get("content") or "")
                finishes += choice["finish_reason"] is not None
    assert finishes == 3
    assert [parts[i] for i in range(3)] == [c["message"]["content"] for c in a["choices"]]


def test_completions_token_ids_lists_echo_and_stops(gw: str) -> None:
    sdk = openai.OpenAI(base_url=gw, api_key="sk-demo-acme", max_retries=0)
    as_text = sdk.completions.create(model="demo", prompt="Shipping is", max_tokens=5, temperature=0)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(__file__).resolve().parents[2] / "models/demo/tokenizer.json"))
    ids = tok.encode("Shipping is", add_special_tokens=False).ids
    as_ids = sdk.completions.create(model="demo", prompt=ids, max_tokens=5, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    listed = sdk.completions.create(model="demo", prompt=["Shipping is", "Refunds take"],
                                    max_tokens=5, temperature=0, n=2, echo=True)
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]
    assert listed.choices[0].text == "Shipping is" + as_text.choices[0].text
    assert listed.choices[2].text.startswith("Refunds take")
    lp = sdk.completions.create(model="demo", prompt="Shipping is", max_tokens=3, temperature=0,
                                logprobs=2)
    assert lp.choices[0].logprobs is not None and len(lp.choices[0].logprobs.tokens or []) == 3
    stops = [f"zz{i}" for i in range(10)] + [as_text.choices[0].text[2:4]]
    stopped = sdk.completions.create(model="demo", prompt="Shipping is", max_tokens=5,
                                     temperature=0, stop=stops)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == as_text.choices[0].text[:as_text.choices[0].text.find(stops[-1])]


def test_images_and_embeddings_are_refused_clearly(gw: str) -> None:
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
              {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]}]
    r = chat(gw, messages=image)
    assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
    r = httpx.post(f"{gw}/embeddings", headers=ACME, json={"model": "demo", "input": "hi"})
    assert r.status_code == 400 and "generation model" in r.json()["error"]["message"]


def test_responses_over_chat_json_and_stream(gw: str) -> None:
    sdk = openai.OpenAI(base_url=gw, api_key="sk-demo-acme", max_retries=0)
    r = sdk.responses.create(model="demo", input="Hello!", instructions="Be kind.",
                             max_output_tokens=12, temperature=0)
    direct = sdk.chat.completions.create(
        model="demo", messages=[{"role": "system", "content": "Be kind."},
                                {"role": "user", "content": "Hello!"}], max_tokens=12, temperature=0)
    assert r.output_text == direct.choices[0].message.content and r.model == "demo"
    assert r.usage is not None and r.usage.output_tokens == (direct.usage.completion_tokens  # type: ignore[union-attr]
                                                            if direct.usage else -1)
    kinds = []
    streamed = ""
    for event in sdk.responses.create(model="demo", input="Hello!", instructions="Be kind.",
                                      max_output_tokens=12, temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            streamed += event.delta
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert streamed == r.output_text
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model="demo", input="hi", store=True)


def test_tenant_output_cap_on_the_local_engine(gw: str) -> None:
    globex = {"authorization": "Bearer sk-demo-globex"}
    r = httpx.post(f"{gw}/chat/completions", headers=globex, timeout=60,
                   json={"model": "demo", "messages": HI, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-gateway-max-output-tokens"] == "6"
    assert r.json()["usage"]["completion_tokens"] <= 6
    r = httpx.post(f"{gw}/chat/completions", headers=globex, timeout=60,
                   json={"model": "demo", "messages": HI, "max_tokens": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_cors(gw: str) -> None:
    root = gw.removesuffix("/v1")
    pre = httpx.options(f"{gw}/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(f"{gw}/chat/completions", json={"model": "demo", "messages": HI, "max_tokens": 2},
                   headers={**ACME, "origin": "https://app.example"}, timeout=60)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    other = httpx.post(f"{gw}/chat/completions", json={"model": "demo", "messages": HI,
                                                         "max_tokens": 2},
                       headers={**ACME, "origin": "https://evil.example"}, timeout=60)
    assert "access-control-allow-origin" not in other.headers
    bad = httpx.options(f"{root}/v1/models", headers={
        "origin": "https://evil.example", "access-control-request-method": "GET"})
    assert "access-control-allow-origin" not in bad.headers
