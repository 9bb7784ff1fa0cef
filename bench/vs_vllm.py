"""The demo model served end to end by `gateway serve` (local engine) and by vLLM CPU.

Same HTTP load against both, one after the other in one run: N concurrent greedy completions
(64-token prompts, `ignore_eos`, 32 new tokens) at concurrency 1, 8 and 32, base model and
an adapter. Reports generated tokens/s and the ratio. Needs .venv-vllm (`make vllm-venv`).
Run: `.venv/bin/python -m bench.vs_vllm`; writes bench/results/vs_vllm.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.server import demo_config, free_port, gateway_process

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
NEW_TOKENS = 32
PROMPT_WORDS = "refund order delivery warranty address payment store hours " * 8


async def load(url: str, key: str, model: str, concurrency: int, rounds: int) -> float:
    """Generated tokens per second over `rounds` waves of `concurrency` requests."""
    body = {"model": model, "prompt": PROMPT_WORDS, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 headers={"authorization": f"Bearer {key}"}) as client:
        await client.post("/completions", json={**body, "max_tokens": 2})  # warm-up
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(rounds):
            replies = await asyncio.gather(*(client.post("/completions", json=body)
                                             for _ in range(concurrency)))
            for r in replies:
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
        return tokens / (time.perf_counter() - t0)


def start_vllm(port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
             "--served-model-name", "demo", "--port", str(port), "--enable-lora",
             "--max-lora-rank", "8", "--max-model-len", "2048",
             "--lora-modules", f"acme-support={MODEL / 'adapters' / 'acme-support'}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vLLM did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def main() -> None:
    if not VLLM_PY.exists():
        sys.exit("no .venv-vllm: run `make vllm-venv` first")
    levels = (1, 8, 32)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(MODEL)
        # The same request shape both ways: one tenant on the base model, one with acme-support.
        cfg["tenants"].append({"name": "base", "api_keys_env": "BASE_KEYS", "models": ["demo"]})
        with gateway_process(cfg, Path(tmp), env={"BASE_KEYS": "sk-base"}) as (url, _):
            for c in levels:
                results[f"memgate base c={c}"] = {"tok_s": asyncio.run(load(url, "sk-base", "demo", c, 2))}
                results[f"memgate lora c={c}"] = {
                    "tok_s": asyncio.run(load(url, "sk-demo-acme", "demo", c, 2))}
        port = free_port()
        proc = start_vllm(port, Path(tmp) / "vllm.log")
        try:
            url = f"http://127.0.0.1:{port}/v1"
            for c in levels:
                results[f"vllm base c={c}"] = {"tok_s": asyncio.run(load(url, "x", "demo", c, 2))}
                results[f"vllm lora c={c}"] = {"tok_s": asyncio.run(load(url, "x", "acme-support", c, 2))}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    print(f"{'requests':10} {'adapter':8} {'memgate tok/s':>14} {'vLLM tok/s':>11} {'ratio':>6}")
    for c in levels:
        for kind in ("base", "lora"):
            ours = results[f"memgate {kind} c={c}"]["tok_s"]
            theirs = results[f"vllm {kind} c={c}"]["tok_s"]
            print(f"{c:<10} {kind:8} {ours:14.0f} {theirs:11.0f} {ours / theirs:6.2f}")
    out = ROOT / "bench" / "results" / "vs_vllm.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
