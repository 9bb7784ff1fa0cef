"""The demo model served end to end by `gateway serve` (local engine) and by vLLM CPU.

Both servers run for the whole benchmark and the same HTTP load alternates between them:
every repeat runs each cell (N concurrent greedy completions: 64-token prompts, `ignore_eos`,
32 new tokens, 2 waves; base model or the acme-support adapter) on both, the order rotating.
Reports medians of generated tokens/s and their ratio. Needs .venv-vllm (`make vllm-venv`).
Run: `.venv/bin/python -m bench.vs_vllm [--repeats 3]`; writes bench/results/vs_vllm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gateway.launch import demo_config, free_port, gateway_process

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
NEW_TOKENS = 32
PROMPT_WORDS = "refund order delivery warranty address payment store hours " * 8


async def load(url: str, key: str, model: str, concurrency: int, rounds: int) -> float:
    """Generated tokens per second over `rounds` waves of `concurrency` requests."""
    body = {"model": model, "prompt": PROMPT_WORDS, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True}
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not VLLM_PY.exists():
        sys.exit("no .venv-vllm: run `make vllm-venv` first")
    levels = [int(c) for c in args.levels.split(",")]
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(MODEL)
        # The same request shape both ways: one tenant on the base model, one with acme-support.
        cfg["tenants"].append({"name": "base", "api_keys_env": "BASE_KEYS", "models": ["demo"]})
        port = free_port()
        proc = start_vllm(port, Path(tmp) / "vllm.log")
        try:
            with gateway_process(cfg, Path(tmp), env={"BASE_KEYS": "sk-base"}) as (gw, _):
                vllm = f"http://127.0.0.1:{port}/v1"
                targets = {
                    "memgate": {"base": (gw, "sk-base", "demo"),
                                "lora": (gw, "sk-demo-acme", "demo")},
                    "vllm": {"base": (vllm, "x", "demo"), "lora": (vllm, "x", "acme-support")},
                }
                for rep in range(args.repeats):
                    for c in levels:
                        for kind in ("base", "lora"):
                            order = list(targets) if rep % 2 == 0 else list(targets)[::-1]
                            for name in order:
                                url, key, model = targets[name][kind]
                                tps = asyncio.run(load(url, key, model, c, 2))
                                runs.setdefault(f"{name} {kind} c={c}", []).append(tps)
                                print(f"repeat {rep + 1} c={c:<3} {kind:5} {name:8} {tps:8.0f} tok/s",
                                      flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\nmedians of {args.repeats}\n| concurrent requests | adapter | memgate tok/s | "
          "vLLM tok/s | ratio |\n|---|---|---|---|---|")
    for c in levels:
        for kind in ("base", "lora"):
            ours, theirs = med[f"memgate {kind} c={c}"], med[f"vllm {kind} c={c}"]
            print(f"| {c} | {kind} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |")
    out = ROOT / "bench" / "results" / "vs_vllm.json"
    out.write_text(json.dumps({"command": "python -m bench.vs_vllm " + " ".join(sys.argv[1:]),
                               "repeats": args.repeats, "runs": runs, "medians": med},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
