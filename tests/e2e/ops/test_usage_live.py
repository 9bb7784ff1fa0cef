"""Usage records of a real `gateway serve --workers 2` (JSON logs) after a mixed load: they sum
to the Prometheus counters (per tenant, model and status; tokens), `gateway usage` sums them,
and no key is in a record or a log line."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import demo_config, metric, running_gateway

LIMITED = "sk-usage-limited"
KEYS = ("sk-demo-acme", "sk-demo-globex", LIMITED, "sk-wrong")


def call(url: str, job: tuple[str, str, str, bool]) -> int:
    key, kind, model, stream = job
    c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
    try:
        if kind == "chat":
            r: Any = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hello, I am {key}"}],
                max_tokens=8, stream=stream, user="alice", metadata={"team": "search"})
        elif kind == "bad":
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                          temperature=9)
        else:
            r = c.completions.create(model=model, prompt="Once upon", max_tokens=6, stream=stream)
        if stream:
            list(r)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def counters(text: str, name: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels["tenant"], labels["model"], labels["status"])
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.timeout(300)
def test_usage_records_sum_to_the_counters(demo_model: Path, tmp_path: Path) -> None:
    cfg = demo_config(demo_model)
    cfg["server"].update(usage_log="usage/usage.jsonl", log_format="json")
    cfg["models"][0]["price"] = {"input_per_1m": 1.5, "output_per_1m": 6.0}
    cfg["tenants"].append({"name": "initech", "models": ["demo"],
                           "api_key_sha256": [hashlib.sha256(LIMITED.encode()).hexdigest()],
                           "limits": {"requests_per_minute": 1}})
    jobs = ([("sk-demo-acme", "chat", "demo", s) for s in (True, False)] * 4
            + [("sk-demo-globex", "text", "demo", s) for s in (True, False)] * 3
            + [("sk-wrong", "chat", "demo", False), ("sk-demo-acme", "chat", "nope", False),
               ("sk-demo-globex", "bad", "demo", False)] + [(LIMITED, "chat", "demo", False)] * 3)
    with running_gateway(cfg, tmp_path, env={"GATEWAY_ADMIN_KEY": "sk-admin"},
                         args=("--workers", "2")) as url:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda j: call(url, j), jobs))
        assert statuses.count(200) >= 14 + 1 and {401, 404, 400, 429} <= set(statuses)
        scraped = httpx.get(url.removesuffix("/v1") + "/metrics").text
        total = sum(counters(scraped, "gateway_requests_total").values())
        assert total == len(jobs)
        usage_dir = tmp_path / "usage"

        def records() -> list[dict[str, Any]]:
            lines = [line for f in sorted(usage_dir.glob("usage.*.jsonl"))
                     for line in f.read_text().splitlines()]
            return [json.loads(line) for line in lines]

        deadline = time.monotonic() + 30  # each worker writes its records once a second
        while len(records()) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        recs = records()
    # a file per worker that served (the kernel may hand every connection to one of the two)
    assert {p.name for p in usage_dir.glob("usage.*.jsonl")} == {
        f"usage.{w}.jsonl" for w in {r["worker"] for r in recs}}
    assert len(recs) == total == len(jobs)
    # per tenant, model and status, as Prometheus counted them
    mine: dict[tuple[str, str, str], float] = {}
    for r in recs:
        key = (r["tenant"] or "none", r["model"] or "none", str(r["status"]))
        mine[key] = mine.get(key, 0) + 1
    assert mine == counters(scraped, "gateway_requests_total")
    assert sum(r["prompt_tokens"] for r in recs) == metric(scraped, "gateway_prompt_tokens_total")
    assert sum(r["completion_tokens"] for r in recs) == metric(
        scraped, "gateway_completion_tokens_total")
    ok = [r for r in recs if r["status"] == 200]
    assert all(r["cost"] == pytest.approx((1.5 * r["prompt_tokens"]
                                           + 6.0 * r["completion_tokens"]) / 1e6) for r in ok)
    assert {r["adapter"] for r in ok if r["tenant"] == "acme"} == {"acme-support"}
    assert {r["user"] for r in ok if r["tenant"] == "acme"} == {"alice"}
    assert len({r["worker"] for r in recs}) <= 2
    # gateway usage sums the per-worker files
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "usage",
                          str(usage_dir / "usage.jsonl"), "--by", "tenant", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    groups = {g["tenant"]: g for g in json.loads(out.stdout)["groups"]}
    assert sum(g["requests"] for g in groups.values()) == len(jobs)
    assert groups["acme"]["completion_tokens"] == sum(
        r["completion_tokens"] for r in recs if r["tenant"] == "acme")
    # no key anywhere; every log line is a JSON object
    log = (tmp_path / "gateway.log").read_text()
    texts = [f.read_text() for f in usage_dir.iterdir()] + [log, scraped]
    for secret in (*KEYS, "sk-admin"):
        assert all(secret not in t for t in texts), secret
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)
