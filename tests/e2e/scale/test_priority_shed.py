"""Request priority across two gateways sharing one Redis and one upstream's KV budget: when the shared KV budget is full, a `low` request of a shed_low tenant is
refused at once (429 low_priority_shed + Retry-After), on the gateway that holds nothing
itself too, while a `normal` one queues and is served; asking above the tenant's class is a
400. Counts and statuses only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.scale.conftest import gateways, in_threads, shared_config, wait_for
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.redis_server import RedisServer

ACME, INITECH = "sk-demo-acme", "sk-initech"


def post(url: str, key: str, priority: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if priority is not None:
        headers["x-gateway-priority"] = priority
    body: dict[str, Any] = {
        "model": "large",
        "max_tokens": 48,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    return httpx.post(f"{url}/chat/completions", headers=headers, json=body, timeout=120)


def test_low_requests_are_shed_at_saturation_across_gateways(
    upstream: CountingUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    cfg = shared_config(upstream.url, redis.url, key_prefix="shed:")
    cfg["tenants"][2]["shed_low"] = True  # initech
    cfg["tenants"][2]["priority"] = "normal"
    with gateways(cfg, tmp_path, n=2) as gws:
        a, b = (url for url, _ in gws)
        r = post(a, INITECH, "high")
        assert r.status_code == 400 and r.json()["error"]["code"] == "priority_not_allowed"
        assert post(b, INITECH, "low").status_code == 200  # room: a low request is served
        upstream.hold()
        upstream.reset_counts()
        fill, filled = in_threads(5, lambda i: post(a, ACME).status_code)  # the KV budget
        try:
            wait_for(lambda: upstream.in_flight == 5, "the shared KV budget full")
            shed = [post(url, INITECH, "low") for url in (a, b)]  # b holds nothing itself
            for r in shed:
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "low_priority_shed"
                assert int(r.headers["retry-after"]) >= 1
            queued, served = in_threads(1, lambda i: post(b, INITECH).status_code)  # normal
            time.sleep(0.5)
            assert upstream.received == 5 and not served  # it waits, it is not refused
        finally:
            upstream.release()
        for t in [*fill, *queued]:
            t.join(120)
        assert filled == [200] * 5 and served == [200]
        assert upstream.received == 6  # the shed ones never reached the upstream
