"""Progressive rollout on the demo model, through real `gateway serve` processes:

  (a) the int8 tier (`quantize: int8`) as a good candidate, from shadow, walks every canary
      step to full by the guards alone;
  (b) a heavily pruned tier (`gateway prune`: half the layers dropped, a quarter of each
      FFN kept) starting at canary is rolled back by the guards (within two windows);
  (c) the primary's TTFT median with a 10% shadow share against without it: three
      interleaved runs of the same load on one gateway (the operator's rollback turns the
      shadow off, advance turns it on again).

Rollout: window_requests 20, canary_steps [0.1, 0.5, 1.0], promote_after_windows 1,
shadow_share 1.0 in (a) and (b) (so that every window has pairs to compare), 0.1 in (c).
Load: `--concurrency` clients, 20 users (sticky: user), greedy chat requests of
`--max-tokens` tokens over a small corpus of shop questions.

Usage: .venv/bin/python bench/rollout.py [--model models/demo] [--concurrency 3]
Prints tables and writes bench/results/rollout.json. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.launch import ACME_SHA, demo_config, running_gateway  # noqa: E402
from gateway.rollout.report import render  # noqa: E402

ADMIN = "sk-bench-admin"
ENV = {"GATEWAY_ADMIN_KEY": ADMIN}
QUESTIONS = ["What do you sell?", "How do I return an item?", "Do you ship abroad?",
             "Where is my refund?", "Can I change my order?", "What are your opening hours?",
             "Do you have gift cards?", "How long does delivery take?"]
GUARDS = {"max_error_rate_delta": 0.05, "max_ttft_p95_ratio": 3.0, "min_agreement": 0.8,
          "max_kv_bytes_ratio": 1.25}


def config(model: Path, candidate: Path, rollout: dict[str, Any], **candidate_cfg: Any) -> dict[str, Any]:
    cfg = demo_config(model)
    cfg["tenants"] = [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["demo"]}]
    cfg["backends"]["candidate"] = {**cfg["backends"]["local"], "model": str(candidate),
                                    **candidate_cfg}
    del cfg["backends"]["candidate"]["adapters_dir"]
    del cfg["backends"]["local"]["adapters_dir"]
    cfg["models"][0]["rollout"] = {"candidate": "candidate", "window_requests": 20,
                                   "canary_steps": [0.1, 0.5, 1.0], "promote_after_windows": 1,
                                   "sticky": "user", "guards": GUARDS, **rollout}
    return cfg


def ask(url: str, i: int, max_tokens: int, stream: bool = False) -> tuple[str | None, float | None]:
    """One greedy request: (its x-gateway-rollout side, the client's TTFT when streamed)."""
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0, "user": f"user-{i % 20}", "stream": stream}
    headers = {"authorization": "Bearer sk-demo-acme"}
    start = time.perf_counter()
    with httpx.Client(timeout=120) as c:
        if not stream:
            r = c.post(url + "/chat/completions", json=body, headers=headers)
            return r.headers.get("x-gateway-rollout"), None
        with c.stream("POST", url + "/chat/completions", json=body, headers=headers) as r:
            ttft = None
            for line in r.iter_lines():
                if ttft is None and line.startswith("data: {") and '"content"' in line:
                    ttft = time.perf_counter() - start
            return r.headers.get("x-gateway-rollout"), ttft


def rollout(url: str) -> dict[str, Any]:
    r = httpx.get(url.removesuffix("/v1") + "/admin/rollouts",
                  headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    return dict(r.json()["data"][0])


def act(url: str, action: str) -> None:
    httpx.post(url.removesuffix("/v1") + "/admin/rollouts/demo", json={"action": action},
               headers={"authorization": f"Bearer {ADMIN}"}, timeout=30).raise_for_status()


def label(state: dict[str, Any]) -> str:
    return state["stage"] + (f"[{state['step']}]" if state["step"] is not None else "")


def walk(url: str, concurrency: int, max_tokens: int, limit: int,
         until: tuple[str, ...]) -> dict[str, Any]:
    """Send load until the rollout reaches one of `until` (or `limit` requests); the stages
    it went through, with the request count at each move."""
    stages = [(label(rollout(url)), 0)]
    sent = 0
    counter = itertools.count()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        while sent < limit:
            list(pool.map(lambda _: ask(url, next(counter), max_tokens), range(concurrency * 2)))
            sent += concurrency * 2
            state = rollout(url)
            if label(state) != stages[-1][0]:
                stages.append((label(state), sent))
            if state["stage"] in until:
                break
    state = rollout(url)
    return {"stages": stages, "requests": sent, "seconds": round(time.perf_counter() - start, 1),
            "final": label(state), "moves": state["history"], "report": state["report"],
            "table": render(state)}


def ttft_runs(url: str, concurrency: int, max_tokens: int, n: int, rounds: int) -> dict[str, Any]:
    """Interleaved runs of the same streamed load with the shadow on (10%) and off."""
    medians: dict[str, list[float]] = {"shadow_10pct": [], "no_shadow": []}
    for _ in range(rounds):
        for mode in ("shadow_10pct", "no_shadow"):
            if mode == "no_shadow":
                act(url, "rollback")
            elif rollout(url)["stage"] != "shadow":
                act(url, "advance")
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                got = list(pool.map(lambda i: ask(url, i, max_tokens, stream=True), range(n)))
            medians[mode].append(statistics.median(t for _, t in got if t is not None))
    on, off = statistics.median(medians["shadow_10pct"]), statistics.median(medians["no_shadow"])
    return {"runs": {k: [round(v * 1000, 2) for v in vs] for k, vs in medians.items()},
            "median_ttft_ms": {"shadow_10pct": round(on * 1000, 2), "no_shadow": round(off * 1000, 2)},
            "ratio": round(on / off, 3), "requests_per_run": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-requests", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout.json")
    args = ap.parse_args()
    model = args.model.resolve()
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} vCPU (shared)",
                               "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model)}
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        work = Path(tmp)
        from backends.local.commands.prune import prune_checkpoint

        pruned = work / "pruned-checkpoint"
        prune_checkpoint(model, pruned, drop_layers=2, ffn_keep=0.25, log=lambda *_: None)
        for name, cand, extra, rollout_cfg, until in (
                ("int8", model, {"quantize": "int8"}, {"stage": "shadow", "shadow_share": 1.0},
                 ("full", "rolled_back")),
                ("pruned", pruned, {}, {"stage": "canary", "shadow_share": 1.0},
                 ("rolled_back", "full"))):
            (work / name).mkdir()
            with running_gateway(config(model, cand, rollout_cfg, **extra), work / name,
                                 env=ENV) as url:
                print(f"== ({'a' if name == 'int8' else 'b'}) {name} candidate", flush=True)
                res = walk(url, args.concurrency, args.max_tokens, 2000, until)
                print(res.pop("table"))
                print("stages:", " -> ".join(f"{s} (@{n})" for s, n in res["stages"]),
                      f"in {res['seconds']} s\n", flush=True)
                results[name] = res
        (work / "ttft").mkdir()
        cfg = config(model, model, {"stage": "shadow", "shadow_share": 0.1, "auto": False},
                     quantize="int8")
        with running_gateway(cfg, work / "ttft", env=ENV) as url:
            for i in range(10):  # warm both tiers
                ask(url, i, args.max_tokens, stream=True)
            res = ttft_runs(url, args.concurrency, args.max_tokens, args.ttft_requests, args.rounds)
        print("== (c) primary TTFT median, shadow 10% vs none (ms, per run):",
              json.dumps(res["runs"]), f"-> ratio {res['ratio']}")
        results["ttft"] = res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
