"""Three real `gateway serve` processes sharing one real Redis, in front of a vLLM-like
upstream that counts what reaches it (tests/e2e/scale/counting_upstream.py)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.redis_server import RedisServer, running_redis
from tests.server import ACME_SHA, GLOBEX_SHA, gateway_process

ENV = {"GATEWAY_ADMIN_KEY": "sk-admin", "INITECH_KEYS": "sk-initech"}
# five requests of 80 tokens (5 blocks of 16, 1 KiB a token): 48 new tokens + the prompt as the
# gateway estimates it for an upstream it cannot count on (the JSON body / 4: 26 tokens)
KV_BUDGET = 5 * 80 * 1024


# fixtures for a module's tests that share one upstream and one Redis
@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream().running() as up:
        yield up


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def shared_config(upstream: str, redis_url: str, **shared: Any) -> dict[str, Any]:
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY", "shutdown_grace_s": 3},
        "backends": {"gpu": {"kind": "vllm", "url": upstream, "kv_budget_bytes": KV_BUDGET,
                             "metrics_max_age": 0.2, "read_timeout": 120, "retries": 0}},
        "models": [{"name": "large", "backend": "gpu"}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["large"],
             "limits": {"requests_per_minute": 60}},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["large"],
             "limits": {"max_concurrency": 4}},
            {"name": "initech", "api_keys_env": "INITECH_KEYS", "models": ["large"]},
        ],
        "policy_options": {"admission": {"queue_timeout_s": 60}},
        "shared_state": {"redis_url": redis_url, "lease_ttl_s": 2, "timeout_s": 0.3, **shared},
    }


@contextlib.contextmanager
def gateways(config: dict[str, Any], workdir: Path, n: int = 3
             ) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    with contextlib.ExitStack() as stack:
        procs = []
        for i in range(n):
            d = workdir / f"gw{i}"
            d.mkdir(exist_ok=True)
            procs.append(stack.enter_context(gateway_process(config, d, env=ENV)))
        yield procs


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def ask(url: str, key: str, stream: bool = False) -> int:
    """One chat request of a fixed size (the same KV reservation every time); the status."""
    c = client(url, key)
    messages: Any = [{"role": "user", "content": "hello there"}]
    try:
        if stream:
            for _ in c.chat.completions.create(model="large", messages=messages, max_tokens=48,
                                               stream=True):
                pass
        else:
            c.chat.completions.create(model="large", messages=messages, max_tokens=48)
    except openai.APIStatusError as exc:
        return exc.status_code
    except openai.APIConnectionError:
        return 0  # the gateway went away (a test killed it)
    return 200


def in_threads(n: int, fn: Callable[[int], int]) -> tuple[list[threading.Thread], list[int]]:
    results: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        status = fn(i)
        with lock:
            results.append(status)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in a gateway's /metrics."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))

