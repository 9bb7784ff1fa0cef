"""Overcommit through the whole gateway: admission learns a tenant's answer lengths, reserves
prompt + that estimate, the engine preempts (swapping KV to host) when answers run longer,
and /metrics shows the preemptions, resumes, swapped bytes and the estimate's error."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import openai

from tests.server import demo_config, metric, running_gateway

BLOCK = 16 * 2048  # the demo model: 2048 KV bytes per token (float32), 16-token blocks


def test_estimate_admission_preempts_and_every_answer_completes(
    demo_model: Path, tmp_path: Path
) -> None:
    cfg = demo_config(demo_model, kv_cache_bytes=16 * BLOCK, swap_bytes=64 * BLOCK,
                      kv_admission="estimate")
    with running_gateway(cfg, tmp_path) as url:
        c = openai.OpenAI(base_url=url, api_key="sk-demo-acme", max_retries=0, timeout=120)

        def ask(max_tokens: int) -> openai.types.chat.ChatCompletion:
            return c.chat.completions.create(
                model="demo", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": "Tell me about refunds."}],
                extra_body={"ignore_eos": True})

        for _ in range(20):  # the estimate learns: this tenant's answers are 2 tokens long
            assert ask(2).usage.completion_tokens == 2  # type: ignore[union-attr]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, [100] * 6))  # then they run to 100: 50x the estimate
        scraped = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    assert all(a.usage is not None and a.usage.completion_tokens == 100 for a in answers)
    assert len({a.choices[0].message.content for a in answers}) == 1  # same greedy answer
    preempted = metric(scraped, "gateway_kv_preemptions_total", backend="local")
    assert preempted > 0
    assert metric(scraped, "gateway_kv_resumes_total", backend="local") == preempted
    swapped = metric(scraped, "gateway_kv_swap_outs_total", backend="local")
    assert swapped > 0  # a sequence preempted before it cached anything has nothing to swap
    assert swapped + metric(scraped, "gateway_kv_recomputes_total", backend="local") == preempted
    assert 'gateway_memory_bytes{backend="local",component="kv_swapped"} 0.0' in scraped
    assert 'gateway_kv_swapped_bytes{backend="local"} 0.0' in scraped  # all resumed
    assert metric(scraped, "gateway_memory_budget_bytes", pool="kv_swap") == 64 * BLOCK
    assert metric(scraped, "gateway_output_estimate_error_tokens_count", direction="under") == 6
