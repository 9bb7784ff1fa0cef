"""vLLM adapter residency shared by three gateways (one Redis): no gateway unloads an adapter
a request elsewhere holds, the adapter byte budget holds across them, each adapter is loaded
once for the fleet."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.scale.conftest import ask, gateways, in_threads, wait_for
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.redis_server import running_redis
from tests.server import ACME_SHA, GLOBEX_SHA


def test_no_gateway_unloads_an_adapter_in_use_elsewhere(demo_model: Path, tmp_path: Path) -> None:
    from backends.hf.safetensors import adapter_bytes

    one = adapter_bytes(demo_model / "adapters" / "acme-support", 4)
    with CountingUpstream().running() as up, running_redis(tmp_path) as redis:
        cfg = {
            "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
            "backends": {"gpu": {"kind": "vllm", "url": up.url, "model_dir": str(demo_model),
                                 "adapters_dir": str(demo_model / "adapters"),
                                 "adapter_budget_bytes": one, "read_timeout": 120, "retries": 0}},
            "models": [{"name": "large", "backend": "gpu"}],
            "tenants": [
                {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["large"],
                 "adapters": {"large": "acme-support"}},
                {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["large"],
                 "adapters": {"large": "globex-legal"}},
            ],
            "policy_options": {"admission": {"queue_timeout_s": 60}},
            "shared_state": {"redis_url": redis.url, "lease_ttl_s": 3},
        }
        with gateways(cfg, tmp_path) as gws:
            a, b, c = (url for url, _ in gws)
            up.hold()
            acme, acme_results = in_threads(2, lambda i: ask([a, b][i], "sk-demo-acme", stream=True))
            wait_for(lambda: up.in_flight == 2, "acme's two requests on acme-support")
            globex, globex_results = in_threads(
                2, lambda i: ask([c, a][i], "sk-demo-globex", stream=True))
            time.sleep(1.0)  # globex's requests wait: the budget holds one adapter, pinned
            assert up.received == 2 and up.loaded == {"acme-support"}
            up.release()
            for t in [*acme, *globex]:
                t.join(120)
    assert acme_results == [200, 200] and globex_results == [200, 200]
    assert up.unloaded_in_use == []  # never an adapter some request was using
    assert up.max_loaded == 1  # the fleet's budget: one adapter at a time
    assert up.loads == 2  # each adapter loaded once for the three gateways
