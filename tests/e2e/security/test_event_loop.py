"""Isolation issue, items 1, 3 and 12 against a real `gateway serve`: one tenant's large
input never holds the event loop (every tenant's /health keeps answering), and a tenant past
its limit is refused before its input costs CPU.

Shapes from the issue, scaled to fail within 30 s on the code before the fix: 100,000
one-word messages (3 MB) and 2,000 long turns that must be trimmed (1: trimming was
quadratic and ran on the event loop); a 3.5 MB prompt (3: tokenized on the event loop); a
rate-limited tenant's large prompts (12: limits ran after the counting)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import demo_config, gateway_process, metric

ACME = {"authorization": "Bearer sk-demo-acme"}
GLOBEX = {"authorization": "Bearer sk-demo-globex"}


@pytest.fixture(scope="module")
def gateway(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    cfg = demo_config(demo_model)
    cfg["server"]["max_body_bytes"] = "8MiB"
    cfg["tenants"][1]["limits"] = {"requests_per_minute": 2}  # globex: item 12
    with gateway_process(cfg, tmp_path_factory.mktemp("loop"),
                         env={"GATEWAY_ADMIN_KEY": "sk-admin"}) as (url, proc):
        yield url.removesuffix("/v1"), proc.pid


class HealthWatch:
    """/health asked over and over from another thread while a request runs: every answer's
    latency, and every ask that got no answer within 1 s."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.latencies: list[float] = []
        self.misses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=1.0) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    client.get(f"{self.base}/health").raise_for_status()
                    self.latencies.append(time.perf_counter() - start)
                except httpx.HTTPError:
                    self.misses += 1
                self._stop.wait(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def post(base: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=30)


def test_100k_one_word_messages_are_refused_at_once_and_health_answers(gateway: tuple[str, int]) -> None:
    base, _ = gateway
    messages = [{"role": "user", "content": "w"} for _ in range(100_000)]
    with HealthWatch(base) as watch:
        r = post(base, "/v1/chat/completions", {"model": "demo", "messages": messages}, ACME)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert watch.misses == 0 and watch.latencies and max(watch.latencies) < 1.0


def test_a_long_chat_is_trimmed_off_the_event_loop(gateway: tuple[str, int]) -> None:
    """2,000 turns of about 850 bytes (3.4 MB): trimmed to the newest turns that fit, and
    served, while /health keeps answering within 1 s."""
    base, _ = gateway
    messages: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
    for i in range(1000):
        messages += [{"role": "user", "content": f"question {i} " + "lorem ipsum " * 70},
                     {"role": "assistant", "content": f"answer {i} " + "dolor sit " * 85}]
    messages.append({"role": "user", "content": "and now?"})
    with HealthWatch(base) as watch:
        r = post(base, "/v1/chat/completions",
                 {"model": "demo", "messages": messages, "max_tokens": 4}, ACME)
    assert r.status_code == 200, r.text
    # counted until the window was surely passed (a longer text is not counted to its end):
    # what was trimmed is at least that
    assert int(r.headers["x-gateway-trimmed-tokens"]) > 2048
    assert watch.misses == 0 and watch.latencies and max(watch.latencies) < 1.0


def test_a_35mb_prompt_is_tokenized_off_the_event_loop(gateway: tuple[str, int]) -> None:
    base, _ = gateway
    prompt = "the quick brown fox jumps over the lazy dog " * 80_000  # 3.5 MB
    with HealthWatch(base) as watch:
        r = post(base, "/v1/completions", {"model": "demo", "prompt": prompt, "max_tokens": 4}, ACME)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert watch.misses == 0 and watch.latencies and max(watch.latencies) < 1.0


def test_a_tenant_past_its_limit_is_refused_before_its_prompt_is_counted(
        gateway: tuple[str, int]) -> None:
    """globex may send 2 requests a minute. Its first two 1 MB prompts are counted (and
    refused as too long for the model: context_trim's decision); the third is a 429 from
    admission's gate, and no policy counted its prompt (no context_trim decision more). Before,
    the limits lived in admission, after trimming: the third was counted like the others and
    refused as too long, the tenant's limit never reached (a 400, not a 429)."""
    base, _ = gateway
    prompt = "the quick brown fox jumps over the lazy dog " * 24_000  # 1 MB
    body = {"model": "demo", "prompt": prompt, "max_tokens": 4}

    def trims() -> float:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return metric(text, "gateway_policy_decisions_total", policy="context_trim")

    counted = []
    for _ in range(3):
        before = trims()
        r = post(base, "/v1/completions", body, GLOBEX)
        counted.append(trims() - before)
        if len(counted) < 3:
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.status_code == 429, r.text
    assert "retry-after" in r.headers
    assert counted == [1, 1, 0]
