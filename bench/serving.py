"""Serve the demo end to end and measure what a user sees: start-up, idle RSS, tokens/s.

Usage: .venv/bin/python bench/serving.py [--requests 16] [--max-tokens 64]
Prints a table and writes bench/results/serving.json. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.local.runtime_memory import resident_bytes  # noqa: E402
from gateway.launch import demo_config, gateway_process  # noqa: E402

PROMPTS = ["How do I get a refund for my order?", "What are your opening hours?",
           "Can I change my delivery address?", "Tell me about the warranty."]


def rss_bytes(pid: int) -> int:
    return resident_bytes(pid) or 0


def one(url: str, key: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
    t0 = time.perf_counter()
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                  max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage is not None
    return r.usage.completion_tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = ROOT / "models" / "demo"
    if not (model / "config.json").exists():
        sys.exit("models/demo is missing: run `make demo-model` first")
    cfg = demo_config(model)
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with gateway_process(cfg, Path(tmp), env={"GATEWAY_ADMIN_KEY": "sk-admin"}) as (url, proc):
            rows["startup_to_ready_s"] = time.perf_counter() - t0
            rows["idle_rss_mb"] = rss_bytes(proc.pid) / 2**20
            one(url, "sk-demo-acme", PROMPTS[0], 8)  # warm-up
            toks, secs = one(url, "sk-demo-acme", PROMPTS[0], args.max_tokens)
            rows["tokens_per_s_single"] = toks / secs
            keys = ["sk-demo-acme", "sk-demo-globex"]
            t1 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
                res = list(pool.map(lambda i: one(url, keys[i % 2], PROMPTS[i % 4], args.max_tokens),
                                    range(args.requests)))
            wall = time.perf_counter() - t1
            rows[f"tokens_per_s_{args.requests}_concurrent"] = sum(t for t, _ in res) / wall
            rows["loaded_rss_mb"] = rss_bytes(proc.pid) / 2**20
            mem = httpx.get(url.removesuffix("/v1") + "/debug/memory",
                            headers={"authorization": "Bearer sk-admin"}).json()
            rows["weights_mb"] = mem["backends"]["local"]["memory"]["weights"] / 2**20
    print(f"{'measure':34} {'value':>10}")
    for k, v in rows.items():
        print(f"{k:34} {v:10.2f}")
    out = ROOT / "bench" / "results" / "serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
