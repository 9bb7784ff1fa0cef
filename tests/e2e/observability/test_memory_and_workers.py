"""Memory accounting adds up; secrets never leak; metrics are right across uvicorn workers."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.server import demo_config, free_port, metric, running_gateway

PROMPT = [{"role": "user", "content": "How do I get a refund for my order?"}]
SECRETS = ("sk-demo-acme", "sk-demo-globex", "sk-admin", "sk-bad-key-123")


def chat(url: str, key: str = "sk-demo-acme", stream: bool = False) -> None:
    c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
    r = c.chat.completions.create(model="demo", messages=PROMPT, max_tokens=12, stream=stream)
    if stream:
        list(r)


def test_memory_adds_up_and_no_secret_leaks(demo_model: Path, tmp_path: Path) -> None:
    with running_gateway(demo_config(demo_model), tmp_path,
                         env={"GATEWAY_ADMIN_KEY": "sk-admin"}) as url:
        base = url.removesuffix("/v1")
        for key in ("sk-demo-acme", "sk-demo-globex"):
            chat(url, key, stream=True)  # warm-up: adapters loaded, first batches run
        with contextlib.suppress(openai.AuthenticationError):
            chat(url, "sk-bad-key-123")
        report = httpx.get(f"{base}/debug/memory", headers={"authorization": "Bearer sk-admin"},
                           timeout=10).json()
        assert httpx.get(f"{base}/debug/memory", headers={"authorization": "Bearer sk-demo-acme"},
                         timeout=10).status_code in (401, 403)
        scraped = httpx.get(f"{base}/metrics", timeout=10).text
    local = report["backends"]["local"]
    comps, measured = local["components"], local["measured"]
    assert measured and measured > 0
    assert sum(comps.values()) == measured == local["components_sum"]  # `other` closes the sum
    assert report["process"]["rss"] > 0 and report["process"]["pss"] > 0
    assert report["gpus"] is None or isinstance(report["gpus"], list)  # absent, not zero
    # metrics agree with /debug/memory on the big stable components
    assert metric(scraped, "gateway_memory_bytes", component="weights") == comps["weights"]
    assert "gateway_gpu_memory_used_bytes" not in scraped or report["gpus"]
    log = (tmp_path / "gateway.log").read_text()
    for secret in SECRETS:
        assert secret not in scraped and secret not in log and secret not in json.dumps(report)
    assert "authorization" not in scraped.lower() and "bearer" not in log.lower()


def test_components_explain_measured_memory_within_10_percent(demo_model: Path,
                                                              tmp_path: Path) -> None:
    with running_gateway(demo_config(demo_model), tmp_path,
                         env={"GATEWAY_ADMIN_KEY": "sk-admin"}) as url:
        for key in ("sk-demo-acme", "sk-demo-globex", "sk-demo-acme"):
            chat(url, key, stream=True)  # warm-up
        keys = ["sk-demo-acme", "sk-demo-globex"] * 8  # then a burst of both tenants at once
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: chat(url, k, stream=True), keys))
        report = httpx.get(url.removesuffix("/v1") + "/debug/memory",
                           headers={"authorization": "Bearer sk-admin"}, timeout=10).json()
    local = report["backends"]["local"]
    comps, measured = local["components"], local["measured"]
    assert abs(comps["other"]) <= 0.10 * measured, (
        f"components explain {measured - comps['other']} of {measured} bytes: {comps}")


def test_metrics_add_up_across_workers(demo_model: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "gateway.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(demo_config(demo_model)))
    port = free_port()
    log = open(tmp_path / "workers.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg_path), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "2"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "workers.log").read_text())
            time.sleep(0.3)
        n = 8
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: chat(f"{base}/v1", stream=bool(i % 2)), range(n)))
        time.sleep(1.5)  # every worker publishes its memory samples once a second
        texts = [httpx.get(f"{base}/metrics", timeout=10).text for _ in range(6)]
        pids = set(re.findall(r"Started server process \[(\d+)\]",
                              (tmp_path / "workers.log").read_text()))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert len(pids) == 2, "expected two worker processes"
    for text in texts:  # whichever worker answered, the counts are the whole gateway's
        assert metric(text, "gateway_requests_total", tenant="acme", status="200") == n
        assert metric(text, "gateway_request_duration_seconds_count", tenant="acme") == n
        # two workers, two engines: the KV budget is the sum of both
        kv = metric(text, "gateway_memory_budget_bytes", pool="kv")
        assert kv == 2 * 32 * 2**20, kv
        assert metric(text, "gateway_process_resident_memory_bytes") > 0
        # the standard process metrics, one line per worker (a pid label)
        assert set(re.findall(r'process_cpu_seconds_total\{pid="(\d+)"\}', text)) == pids
