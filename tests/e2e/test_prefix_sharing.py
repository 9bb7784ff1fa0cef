"""Prefix sharing through a real gateway serve and the openai SDK: a tenant's second request
with the same long system prompt reports cached prompt tokens, another tenant's does not
(prefix_cache: isolated), and an answer's headers give its KV peak and its share of it."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.server import demo_config, running_gateway

SYSTEM = "You are the support desk of a small shop. " * 12  # several full KV blocks


def ask(url: str, key: str, n: int = 1) -> tuple[int, int, dict[str, str]]:
    c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(
        model="demo", temperature=0, max_tokens=8, n=n,
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "How do I get a refund?"}])
    r = raw.parse()
    assert r.usage is not None
    details = r.usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None and details.cached_tokens else 0
    return r.usage.prompt_tokens, cached, dict(raw.headers)


def test_cached_prompt_tokens_and_the_shared_share(demo_model: Path, tmp_path: Path) -> None:
    with running_gateway(demo_config(demo_model), tmp_path) as url:
        prompt, cached, _ = ask(url, "sk-demo-acme")
        assert prompt > 64 and cached == 0  # the first computes every block
        _, cached, head = ask(url, "sk-demo-acme")
        assert 0 < cached < prompt and cached % 16 == 0  # whole blocks, the last token computed
        peak, share = int(head["x-gateway-kv-peak-bytes"]), int(head["x-gateway-kv-peak-share-bytes"])
        assert 0 < share == peak  # the first request has ended: no one else holds the blocks
        _, cached, _ = ask(url, "sk-demo-globex")  # another tenant: isolated
        assert cached == 0
        _, _, head = ask(url, "sk-demo-globex", n=2)  # two choices share the prompt's blocks
        peak, share = int(head["x-gateway-kv-peak-bytes"]), int(head["x-gateway-kv-peak-share-bytes"])
        assert 0 < share < peak
