"""Two local-engine gateways as `openai`-kind replicas of one tier behind a front gateway:
adapters stay on one replica each, and losing a replica moves traffic to the other."""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import ACME_SHA, GLOBEX_SHA, demo_config, gateway_process, running_gateway

PROMPT = [{"role": "user", "content": "Where is my parcel?"}]
ADMIN = {"authorization": "Bearer sk-admin"}
KEYS = {"acme": "sk-demo-acme", "globex": "sk-demo-globex"}
ADAPTERS = {"acme": "acme-support", "globex": "globex-legal"}


def upstream_config(demo_model: Path) -> dict[str, Any]:
    cfg = demo_config(demo_model)
    # the front authenticates as acme for everyone and names the adapter: demo:<adapter>
    cfg["tenants"][0]["allowed_adapters"] = {"demo": ["globex-legal"]}
    return cfg


def front_config(r1: str, r2: str) -> dict[str, Any]:
    replica = {"kind": "openai", "api_key_env": "UPSTREAM_KEY", "model": "demo",
               "adapter_model": "{model}:{adapter}", "retries": 1, "cooldown_s": 30,
               "read_timeout": 60}
    return {
        "backends": {"r1": {**replica, "url": r1}, "r2": {**replica, "url": r2}},
        "models": [{"name": "demo", "backends": ["r1", "r2"]}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["demo"],
             "adapters": {"demo": "acme-support"}},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["demo"],
             "adapters": {"demo": "globex-legal"}},
        ],
    }


Replicas = tuple[str, dict[str, tuple[str, subprocess.Popen[bytes]]]]


@pytest.fixture(scope="module")
def replicas(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    env = {"GATEWAY_ADMIN_KEY": "sk-admin", "UPSTREAM_KEY": "sk-demo-acme"}
    dirs = [tmp_path_factory.mktemp(n) for n in ("r1", "r2", "front")]
    with (
        gateway_process(upstream_config(demo_model), dirs[0], env) as r1,
        gateway_process(upstream_config(demo_model), dirs[1], env) as r2,
        running_gateway(front_config(r1[0], r2[0]), dirs[2], env) as front,
    ):
        yield front, {"r1": r1, "r2": r2}


def ask(url: str, tenant: str) -> Any:
    return openai.OpenAI(base_url=url, api_key=KEYS[tenant], max_retries=0, timeout=60) \
        .chat.completions.with_raw_response.create(
            model="demo", messages=PROMPT, temperature=0, max_tokens=8)


def resident(upstream: str) -> set[str]:
    memory = httpx.get(upstream.removesuffix("/v1") + "/debug/memory", headers=ADMIN).json()
    return set(memory["backends"]["local"]["memory"]["adapters"])


def test_adapters_stay_on_one_replica_then_fail_over(replicas: Replicas) -> None:
    front, ups = replicas
    assert all(resident(url) == set() for url, _ in ups.values())
    served: dict[str, set[str]] = {"acme": set(), "globex": set()}
    for _ in range(4):  # warm-up: sequential, both tenants
        for tenant in served:
            served[tenant].add(ask(front, tenant).headers["x-gateway-backend"])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # and a little concurrency
        for tenant, r in zip(list(served) * 3, pool.map(lambda t: ask(front, t), list(served) * 3),
                             strict=True):
            served[tenant].add(r.headers["x-gateway-backend"])
    assert all(len(b) == 1 for b in served.values()), served
    assert served["acme"] != served["globex"]  # spread over both replicas
    for tenant, adapter in ADAPTERS.items():
        holders = [name for name, (url, _) in ups.items() if adapter in resident(url)]
        assert holders == list(served[tenant]), (adapter, holders)

    # stop the replica acme uses while traffic flows: at most the requests in flight fail
    victim = next(iter(served["acme"]))
    survivor = next(n for n in ups if n != victim)
    results: list[str] = []
    stop = threading.Event()

    def traffic(tenant: str) -> None:
        while not stop.is_set():
            try:
                results.append(ask(front, tenant).headers["x-gateway-backend"])
            except openai.APIError as exc:
                results.append(f"error {exc}")

    threads = [threading.Thread(target=traffic, args=(t,)) for t in ("acme", "globex")]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ups[victim][1].kill()
    killed_at = len(results)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(60)
    after = results[killed_at:]
    errors = [r for r in after if r.startswith("error")]
    assert len(errors) <= len(threads), errors  # only requests in flight at the kill
    assert len(after) - len(errors) >= 4
    assert all(r == survivor for r in after[len(threads):] if not r.startswith("error"))
    assert ask(front, "acme").headers["x-gateway-backend"] == survivor
    ready = httpx.get(front.removesuffix("/v1") + "/ready", timeout=10)
    assert ready.status_code == 200, ready.text  # the model still has a healthy replica
    assert ready.json()["backends"][victim] is False and ready.json()["models"]["demo"] is True
