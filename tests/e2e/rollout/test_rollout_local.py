"""Shadow copies on the embedded engine (the demo model, an int8 candidate tier) through a
real `gateway serve` and the official SDK: a client's greedy answers are the bytes a gateway
without the rollout gives; a copy the candidate has no room for is dropped, never queued;
and no copy counts in the tenant's rate limits, token quota, budget or usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.usage_report import report
from tests.e2e.rollout.conftest import ENV, base, rollout, sdk, wait_for
from tests.server import demo_config, metric, running_gateway

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "demo"
PROMPTS = ["What do you sell?", "How do I return an item?", "Hello there", "Do you ship abroad?"]


def local_config(rollout: dict[str, Any] | None, tmp: Path) -> dict[str, Any]:
    cfg = demo_config(MODEL_DIR)
    cfg["server"]["usage_log"] = str(tmp / "usage.jsonl")
    if rollout is not None:
        # the candidate: the same checkpoint as int8, with a small KV pool (8 blocks)
        cfg["backends"]["int8"] = {**cfg["backends"]["local"], "quantize": "int8",
                                   "kv_cache_bytes": "256KiB"}
        cfg["models"][0]["rollout"] = {"candidate": "int8", **rollout}
    cfg["models"][0]["price"] = {"input_per_1m": 1000.0, "output_per_1m": 1000.0}
    cfg["tenants"][1]["limits"] = {"requests_per_minute": 5, "tokens_per_minute": 400,
                                   "budget": {"amount": 1000.0, "period": "month"}}
    return cfg


def greedy_bodies(url: str) -> list[dict[str, Any]]:
    client = sdk(url)
    out = []
    for prompt in PROMPTS:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=8)
        body = raw.http_response.json()
        out.append({k: v for k, v in body.items() if k not in ("id", "created")})
    return out


def shadows(url: str) -> dict[str, float]:
    text = httpx.get(base(url) + "/metrics", timeout=10).text
    return {o: metric(text, "gateway_shadow_requests_total", outcome=o)
            for o in ("compared", "dropped", "error")}


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("shadowed")
    cfg = local_config({"stage": "shadow", "shadow_share": 1.0, "auto": False}, tmp)
    with running_gateway(cfg, tmp, env=ENV) as url:
        yield url, tmp


def test_shadow_never_changes_a_clients_bytes(tmp_path: Path,
                                              shadowed: tuple[str, Path]) -> None:
    with running_gateway(local_config(None, tmp_path), tmp_path, env=ENV) as plain:
        expected = greedy_bodies(plain)
    url, _ = shadowed
    before = sum(shadows(url).values())
    assert greedy_bodies(url) == expected
    wait_for("every copy's outcome", lambda: sum(shadows(url).values()) == before + len(PROMPTS))
    assert shadows(url)["compared"] >= 1  # the copies ran: the answers above were shadowed
    assert rollout(url, "demo")["report"]["greedy_pairs"] >= 1


def test_a_copy_without_room_is_dropped_not_queued(shadowed: tuple[str, Path]) -> None:
    url, _ = shadowed
    before = shadows(url)
    client = sdk(url)
    for prompt in PROMPTS:  # prompt + 200 tokens: 14 blocks; the candidate holds 8
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=200,
            temperature=0)
        assert raw.headers["x-gateway-rollout"] == "primary"
        assert raw.headers["x-gateway-backend"] == "local"
        assert raw.headers["x-gateway-queue-ms"] == "0"
    wait_for("the drops", lambda: shadows(url)["dropped"] == before["dropped"] + len(PROMPTS))
    after = shadows(url)
    assert (after["compared"], after["error"]) == (before["compared"], before["error"])
    reserved = httpx.get(base(url) + "/debug/memory", timeout=10,
                         headers={"authorization": f"Bearer {ENV['GATEWAY_ADMIN_KEY']}"}).json()
    assert reserved["reservations"]["backends"].get("int8", {}).get("reserved_bytes", 0) == 0


def test_shadow_is_not_counted_in_limits_quota_budget_or_usage(shadowed: tuple[str, Path]) -> None:
    url, tmp = shadowed
    before = sum(shadows(url).values())
    client = sdk(url, "sk-demo-globex")  # 5 requests a minute, 400 tokens a minute
    for i in range(5):  # each copy would be a sixth, seventh... request and ~30 more tokens
        client.chat.completions.create(model="demo", temperature=0, max_tokens=8,
                                       messages=[{"role": "user", "content": f"hi {i}"}])
    wait_for("the copies", lambda: sum(shadows(url).values()) == before + 5)
    assert shadows(url)["compared"] >= 1
    with pytest.raises(openai.RateLimitError):  # the limit is live: the 6th is refused
        client.chat.completions.create(model="demo", max_tokens=8,
                                       messages=[{"role": "user", "content": "one more"}])
    text = httpx.get(base(url) + "/metrics", timeout=10).text
    assert metric(text, "gateway_requests_total", tenant="globex") == 6

    def records() -> list[dict[str, Any]]:
        path = tmp / "usage.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    wait_for("the usage records", lambda: sum(
        1 for r in records() if r.get("tenant") == "globex" and not r.get("shadow")) == 6)
    mine = [r for r in records() if r.get("tenant") == "globex"]
    copies = [r for r in mine if r.get("shadow")]
    assert copies and all(r["backend"] == "int8" and r["rollout"] == "shadow" for r in copies)
    assert all(r["rollout"] == "primary" for r in mine if not r.get("shadow"))
    billed = sum(r["cost"] for r in mine if not r.get("shadow"))
    assert billed > 0 and all("cost" not in r for r in copies)  # a copy bills nobody
    budgets = httpx.get(base(url) + "/admin/usage", timeout=10, headers={
        "authorization": f"Bearer {ENV['GATEWAY_ADMIN_KEY']}"}).json()["budgets"]
    assert budgets["globex"]["spent"] == pytest.approx(billed, rel=1e-6)  # not the copies'
    summed = json.loads(report([str(tmp / "usage.jsonl")], "tenant", None, as_json=True))
    globex = next(g for g in summed["groups"] if g["tenant"] == "globex")
    assert globex["requests"] == 6
    assert globex["completion_tokens"] == sum(r["completion_tokens"] for r in mine
                                              if not r.get("shadow"))
