"""A tier whose backend fails before the first byte falls back to its degrade_to tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import ACME_SHA, GLOBEX_SHA, free_port, reservations, running_gateway

PROMPT = [{"role": "user", "content": "What are your opening hours?"}]


def fallback_config(demo_model: Path) -> dict[str, Any]:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    both = ["demo-large", "demo"]
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
        "backends": {
            "gpu": {"kind": "openai", "url": dead, "retries": 1, "cooldown_s": 60},
            "small": {"kind": "local", "model": str(demo_model), "kv_cache_bytes": "32MiB",
                      "adapters_dir": str(demo_model / "adapters")},
        },
        "models": [{"name": "demo-large", "backend": "gpu", "degrade_to": "demo"},
                   {"name": "demo", "backend": "small"}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": both,
             "adapters": {"demo": "acme-support"}},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": both,
             "adapters": {"demo": "globex-legal"}, "allow_degrade": False},
            {"name": "metered", "api_keys_env": "METERED_KEYS", "models": both,
             "limits": {"requests_per_minute": 2}},
        ],
    }


@pytest.fixture(scope="module")
def gateway(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(fallback_config(demo_model), tmp_path_factory.mktemp("fallback"),
                         env={"GATEWAY_ADMIN_KEY": "sk-admin", "METERED_KEYS": "sk-metered"},
                         ready_path="/health") as url:
        yield url


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_dead_tier_falls_back_to_degrade_to(gateway: str) -> None:
    kw: dict[str, Any] = {"messages": PROMPT, "temperature": 0, "max_tokens": 12}
    r = sdk(gateway, "sk-demo-acme").chat.completions.with_raw_response.create(
        model="demo-large", **kw)
    assert r.headers["x-gateway-degraded-from"] == "demo-large"
    assert r.headers["x-gateway-backend"] == "small"
    assert r.headers["x-gateway-adapter"] == "acme-support"  # the tenant's adapter there
    fell = r.parse()
    direct = sdk(gateway, "sk-demo-acme").chat.completions.create(model="demo", **kw)
    assert fell.model == "demo"
    assert fell.choices[0].message.content == direct.choices[0].message.content
    # streaming: the failure happens before the first byte, so the stream is the small tier's
    parts = list(sdk(gateway, "sk-demo-acme").chat.completions.create(
        model="demo-large", stream=True, **kw))
    assert {p.model for p in parts} == {"demo"}
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == \
        direct.choices[0].message.content


def test_tenant_without_degrade_gets_the_error(gateway: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        sdk(gateway, "sk-demo-globex").chat.completions.create(model="demo-large", messages=PROMPT)
    assert info.value.status_code in (502, 503)
    assert info.value.response.json()["error"]["code"] in (
        "upstream_unreachable", "upstream_unavailable")


def test_fallbacks_are_counted_and_nothing_stays_reserved(gateway: str) -> None:
    root = gateway.removesuffix("/v1")
    sdk(gateway, "sk-demo-acme").chat.completions.create(model="demo-large", messages=PROMPT)
    metrics = httpx.get(f"{root}/metrics").text
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("gateway_policy_decisions_total{")
                and 'policy="fallback"' in ln and 'action="modify"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert reservations(gateway)["reserved_bytes"] == 0


def test_a_failover_is_charged_once(gateway: str) -> None:
    """requests_per_minute 2: two requests that each failed over are two requests, not four."""
    client = sdk(gateway, "sk-metered")
    for _ in range(2):
        r = client.chat.completions.with_raw_response.create(
            model="demo-large", messages=PROMPT, max_tokens=4)
        assert r.headers["x-gateway-degraded-from"] == "demo-large"
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="demo-large", messages=PROMPT, max_tokens=4)
    assert info.value.response.json()["error"]["code"] == "rate_limit_exceeded"
