"""More requests per KV byte: reserve-all against overcommit + swap, + prefix
sharing, + int8 KV, side by side in one run on the same KV budget; then length lanes under a
flood of long-prompt requests; then int8 KV's closeness to the float cache.

Usage: .venv/bin/python bench/capacity.py [--seconds 30] [--rounds 2] [--model models/demo]
Prints tables and writes bench/results/capacity.json. Not a test: it asserts nothing.

Workload (the issue's): three tenants (acme and globex on their adapters, initech on the base
model), each opening every request with its own ~400-token system prompt, then one of the
corpus' questions; `max_tokens: 1024` (what chat clients send), temperature 0.8, so answers
stop naturally. A closed loop at saturation: `concurrency` clients (4x what reserve-all can
run on the budget) send back to back. The local backend is driven in process (no HTTP); each
request carries the expected output length the admission policy would give it
(policies/estimate.py's p90 per tenant/model/adapter, learnt in a warm-up), which only the
`estimate` configurations use. Configurations are interleaved in `rounds` to spread the
shared machine's noise; every figure is over the measured windows only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.local.backend import LocalBackend, LocalConfig  # noqa: E402
from gateway.core.context import RequestContext, SamplingParams  # noqa: E402
from gateway.core.kv import Lanes  # noqa: E402
from policies.estimate import Estimates  # noqa: E402

TENANTS = (("acme", "acme-support", "demo_acme.txt"), ("globex", "globex-legal", "demo_globex.txt"),
           ("initech", None, "demo_base.txt"))
MAX_TOKENS = 1024


def corpus(name: str) -> tuple[list[str], list[str]]:
    """(assistant lines, user lines) of one of the demo's corpus files."""
    said: list[str] = []
    asked: list[str] = []
    for line in (ROOT / "gateway" / "data" / name).read_text().splitlines():
        if line.startswith("assistant: "):
            said.append(line.removeprefix("assistant: "))
        elif line.startswith("user: "):
            asked.append(line.removeprefix("user: "))
    return said, asked


@dataclass
class Workload:
    system: dict[str, str]  # tenant -> its system prompt
    questions: dict[str, list[str]]
    adapters: dict[str, str | None]


def workload(backend: LocalBackend, target_tokens: int = 400) -> Workload:
    system, questions, adapters = {}, {}, {}
    for tenant, adapter, name in TENANTS:
        said, asked = corpus(name)
        text = f"You are the assistant of {tenant}. House style, by example: "
        for line in said:
            probe = request(tenant, adapter, text + line, "Hi", 1)
            if (backend.count_tokens(probe) or 0) > target_tokens:
                break
            text += line + " "
        system[tenant], questions[tenant], adapters[tenant] = text, asked, adapter
    return Workload(system, questions, adapters)


def request(tenant: str, adapter: str | None, system: str, question: str, max_tokens: int,
            seed: int = 0, temperature: float = 0.8) -> RequestContext:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return RequestContext(
        request_id=f"{tenant}-{seed}", tenant=tenant, kind="chat", requested_model="demo",
        target_model="demo", backend="local", sampling=sampling, adapter=adapter,
        body={"max_tokens": max_tokens, "temperature": temperature, "seed": seed},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
    )


@dataclass
class Result:
    completed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    peak_running: int = 0
    ttft: list[float] = field(default_factory=list)
    preemptions: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0

    def row(self) -> dict[str, Any]:
        q = statistics.quantiles(self.ttft, n=100) if len(self.ttft) > 1 else [0.0] * 99
        return {"peak_running": self.peak_running, "completed": self.completed,
                "requests_per_s": self.completed / self.seconds,
                "output_tokens_per_s": self.output_tokens / self.seconds,
                "ttft_p50_s": statistics.median(self.ttft) if self.ttft else None,
                "ttft_p99_s": q[98] if self.ttft else None, "preemptions": self.preemptions,
                "cached_prompt_share": self.cached_tokens / max(self.prompt_tokens, 1),
                "seconds": self.seconds}


async def one(backend: LocalBackend, ctx: RequestContext, res: Result, deadline: float) -> None:
    t0 = time.perf_counter()
    first: float | None = None
    last = None
    gen = backend.generate(ctx)
    try:
        async for chunk in gen:
            if first is None and chunk.text:
                first = time.perf_counter()
            last = chunk
            if time.perf_counter() > deadline:
                return  # cut at the window's end: not counted
    finally:
        await gen.aclose()
    if last is None or last.usage is None or time.perf_counter() > deadline:
        return
    res.completed += 1
    res.output_tokens += last.usage.completion_tokens
    res.cached_tokens += last.usage.cached_tokens
    res.prompt_tokens += last.usage.prompt_tokens
    res.ttft.append((first or time.perf_counter()) - t0)


async def closed_loop(backend: LocalBackend, wl: Workload, est: Estimates, concurrency: int,
                      seconds: float, res: Result, seed: int, estimate: bool) -> None:
    deadline = time.perf_counter() + seconds
    engine = backend._engine
    assert engine is not None
    before = engine.scheduler.stats.preemptions

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        tenant = TENANTS[i % 3][0]
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            ctx = request(tenant, wl.adapters[tenant], wl.system[tenant],
                          rng.choice(wl.questions[tenant]), MAX_TOKENS, seed * 100000 + i * 1000 + n)
            key = (tenant, "demo", wl.adapters[tenant] or "")
            if estimate:
                ctx.expected_tokens = est.expected(key, MAX_TOKENS)
            await one(backend, ctx, res, deadline)

    async def watch() -> None:
        while time.perf_counter() < deadline:
            res.peak_running = max(res.peak_running, len(engine.scheduler.running))
            await asyncio.sleep(0.005)

    t0 = time.perf_counter()
    await asyncio.gather(watch(), *[client(i) for i in range(concurrency)])
    res.seconds += time.perf_counter() - t0
    res.preemptions += engine.scheduler.stats.preemptions - before


async def learn(backend: LocalBackend, wl: Workload, est: Estimates, per_tenant: int) -> list[int]:
    """The warm-up: answers whose lengths the estimate learns (what admission would see)."""
    lengths: list[int] = []

    async def tenant_run(t: int) -> None:
        tenant, adapter, _ = TENANTS[t]
        rng = random.Random(t)
        for k in range(per_tenant):
            ctx = request(tenant, adapter, wl.system[tenant], rng.choice(wl.questions[tenant]),
                          MAX_TOKENS, 7_000_000 + t * 1000 + k)
            last = None
            async for chunk in backend.generate(ctx):
                last = chunk
            assert last is not None and last.usage is not None
            est.observe((tenant, "demo", adapter or ""), last.usage.completion_tokens)
            lengths.append(last.usage.completion_tokens)

    await asyncio.gather(*[tenant_run(t) for t in range(3)])
    return lengths


CONFIGS: dict[str, dict[str, Any]] = {
    "reserve-all (worst_case)": {"kv_admission": "worst_case", "prefix_cache": "off"},
    "overcommit + swap": {"kv_admission": "estimate", "prefix_cache": "off"},
    "+ prefix sharing": {"kv_admission": "estimate", "prefix_cache": "isolated"},
    "+ int8 KV": {"kv_admission": "estimate", "prefix_cache": "isolated", "kv_dtype": "int8"},
}


async def capacity(args: argparse.Namespace) -> dict[str, Any]:
    model = str(args.model)
    probe = LocalBackend("local", LocalConfig(model=model, adapters_dir=f"{model}/adapters"))
    await probe.start()
    wl = workload(probe)
    prompt = max(probe.count_tokens(request(t, wl.adapters[t], wl.system[t], q, 1)) or 0
                 for t in wl.system for q in wl.questions[t])
    est = Estimates()
    warm = await learn(probe, wl, est, args.warmup)
    await probe.aclose()
    engine = probe._engine
    assert engine is not None
    per_request = engine.kv_bytes_for(prompt + MAX_TOKENS)  # what reserve-all reserves
    budget = args.reserve_all_slots * per_request
    concurrency = 4 * args.reserve_all_slots
    backends = {}
    for name, extra in CONFIGS.items():
        b = LocalBackend("local", LocalConfig(model=model, adapters_dir=f"{model}/adapters",
                                              kv_cache_bytes=budget, swap_bytes=budget, **extra))
        await b.start()
        backends[name] = b
    results = {name: Result() for name in CONFIGS}
    for r in range(args.rounds):
        for name, b in backends.items():
            estimate = CONFIGS[name]["kv_admission"] == "estimate"
            await closed_loop(b, wl, est, concurrency, args.seconds / args.rounds, results[name],
                              r, estimate)
    caps = {name: b.capacity() for name, b in backends.items()}
    for b in backends.values():
        await b.aclose()
    rows = {name: res.row() for name, res in results.items()}
    base = rows["reserve-all (worst_case)"]
    for row in rows.values():
        row["ratio_peak_running"] = row["peak_running"] / max(base["peak_running"], 1)
        row["ratio_requests_per_s"] = row["requests_per_s"] / max(base["requests_per_s"], 1e-9)
        row["ratio_ttft_p99"] = (row["ttft_p99_s"] or 0) / max(base["ttft_p99_s"] or 1e-9, 1e-9)
    return {"kv_budget_bytes": budget, "concurrency": concurrency, "max_prompt_tokens": prompt,
            "reserve_all_bytes_per_request": per_request,
            "bytes_per_token": {n: c.bytes_per_token for n, c in caps.items() if c is not None},
            "warmup_completion_tokens": sorted(warm),
            "estimate_p90": {k[0]: est.p90(k) for k in est._keys}, "configs": rows}


async def lanes(args: argparse.Namespace) -> dict[str, Any]:
    """Short chats while a flood of long-prompt requests saturates the cache, without and with
    lanes (reserve-all, no prefix cache: the lanes alone)."""
    model = str(args.model)
    said, _ = corpus("demo_base.txt")
    probe = LocalBackend("local", LocalConfig(model=model, adapters_dir=f"{model}/adapters"))
    await probe.start()
    long_text = ""
    for line in said * 20:
        ctx = request("initech", None, long_text + line, "Summarise.", 64)
        if (probe.count_tokens(ctx) or 0) > args.long_prompt:
            break
        long_text += line + " "
    engine = probe._engine
    assert engine is not None
    long_tokens = probe.count_tokens(request("initech", None, long_text, "Summarise.", 64)) or 0
    budget = 3 * engine.kv_bytes_for(long_tokens + 64)
    await probe.aclose()
    out: dict[str, Any] = {"kv_budget_bytes": budget, "long_prompt_tokens": long_tokens}
    short_q = corpus("demo_base.txt")[1]
    runs = {"without lanes": None, "with lanes": Lanes(short_max_tokens=256, short_share=0.25)}
    backends = {}
    for name, lane in runs.items():
        b = LocalBackend("local", LocalConfig(model=model, adapters_dir=f"{model}/adapters",
                                              kv_cache_bytes=budget, kv_admission="worst_case",
                                              prefix_cache="off", lanes=lane))
        await b.start()
        backends[name] = b
    results = {name: (Result(), Result()) for name in runs}
    for r in range(args.rounds):
        for name, b in backends.items():
            deadline = time.perf_counter() + args.seconds / args.rounds / 2
            longs, shorts = results[name]

            async def flood(i: int, b: LocalBackend = b, longs: Result = longs,
                            deadline: float = deadline, r: int = r) -> None:
                k = 0
                while time.perf_counter() < deadline:
                    k += 1
                    ctx = request("initech", None, long_text, f"Summarise part {k}.", 64,
                                  seed=r * 10000 + i * 100 + k)
                    await one(b, ctx, longs, deadline)

            async def chat(i: int, b: LocalBackend = b, shorts: Result = shorts,
                           deadline: float = deadline, r: int = r) -> None:
                rng = random.Random(r * 100 + i)
                k = 0
                await asyncio.sleep(0.2)  # behind the flood
                while time.perf_counter() < deadline:
                    k += 1
                    ctx = request("initech", None, "Be brief.", rng.choice(short_q), 32,
                                  seed=r * 10000 + i * 100 + k)
                    await one(b, ctx, shorts, deadline)

            t0 = time.perf_counter()
            await asyncio.gather(*[flood(i) for i in range(8)], *[chat(i) for i in range(2)])
            longs.seconds += time.perf_counter() - t0
            shorts.seconds += time.perf_counter() - t0
    for b in backends.values():
        await b.aclose()
    for name, (longs, shorts) in results.items():
        out[name] = {"short": shorts.row(), "long": longs.row()}
    p99 = [out[n]["short"]["ttft_p99_s"] or 0 for n in runs]
    out["short_ttft_p99_ratio_without_over_with"] = p99[0] / max(p99[1], 1e-9)
    return out


def int8_quality(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from backends.hf.tokenizer import ChatTokenizer
    from backends.local.commands.kv_quality import compare
    from backends.local.commands.mid_model import write_mid
    from backends.local.loader import load_checkpoint

    out: dict[str, Any] = {}
    models = {"demo": Path(args.model)}
    tmp = None
    if args.mid is not None:
        models["mid (random, 8 layers)"] = Path(args.mid)
    else:
        tmp = tempfile.TemporaryDirectory()
        write_mid(Path(tmp.name) / "mid", log=lambda *_: None)
        models["mid (random, 8 layers)"] = Path(tmp.name) / "mid"
    for name, path in models.items():
        loaded = load_checkpoint(path, "float32", "cpu", "none")
        tok = ChatTokenizer.from_dir(path, loaded.config.eos_token_ids)
        prompts = []
        for _, _, fname in TENANTS:
            said, asked = corpus(fname)
            for q in asked[:4]:
                prompts.append(tok.encode_chat([{"role": "system", "content": " ".join(said[:8])},
                                                {"role": "user", "content": q}], None, None))
        q = compare(loaded.model, prompts, args.quality_tokens)
        out[name] = {"steps": q.steps, "greedy_agreement": q.agreement,
                     "logit_cosine_mean": q.cosine_mean, "logit_cosine_min": q.cosine_min}
    if tmp is not None:
        tmp.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--mid", type=Path, default=None, help="a `gateway demo-model --size mid` "
                    "dir (default: written to a temporary dir)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per config")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reserve-all-slots", type=int, default=4,
                    help="the KV budget holds this many reserve-all requests")
    ap.add_argument("--warmup", type=int, default=24, help="warm-up answers per tenant (the "
                    "estimate needs 20)")
    ap.add_argument("--long-prompt", type=int, default=1500)
    ap.add_argument("--quality-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "capacity.json")
    args = ap.parse_args()
    cap = asyncio.run(capacity(args))
    print(f"KV budget {cap['kv_budget_bytes']:,} B ({cap['reserve_all_bytes_per_request']:,} B per "
          f"reserve-all request), closed loop of {cap['concurrency']} clients, "
          f"max_tokens {MAX_TOKENS}; warm-up answers {cap['warmup_completion_tokens']}")
    head = (f"{'configuration':<26}{'peak run':>9}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}"
            f"{'TTFT p99':>10}{'preempt':>8}{'cached':>8}  ratios vs reserve-all (peak, req/s, p99)")
    print(head)
    for name, row in cap["configs"].items():
        print(f"{name:<26}{row['peak_running']:>9}{row['requests_per_s']:>8.2f}"
              f"{row['output_tokens_per_s']:>8.1f}{row['ttft_p50_s']:>9.3f}s{row['ttft_p99_s']:>9.3f}s"
              f"{row['preemptions']:>8}{row['cached_prompt_share']:>8.0%}  "
              f"{row['ratio_peak_running']:.1f}x {row['ratio_requests_per_s']:.2f}x "
              f"{row['ratio_ttft_p99']:.2f}x")
    lane = asyncio.run(lanes(args))
    print(f"\nlanes: flood of {lane['long_prompt_tokens']}-token prompts (8 clients) + 2 short "
          f"chat clients, KV budget {lane['kv_budget_bytes']:,} B (3 long requests)")
    print(f"{'':<16}{'short TTFT p50':>15}{'short TTFT p99':>15}{'short done':>11}{'long done':>10}")
    for name in ("without lanes", "with lanes"):
        s, lg = lane[name]["short"], lane[name]["long"]
        print(f"{name:<16}{s['ttft_p50_s'] or 0:>14.3f}s{s['ttft_p99_s'] or 0:>14.3f}s"
              f"{s['completed']:>11}{lg['completed']:>10}")
    print(f"short TTFT p99 without / with lanes: {lane['short_ttft_p99_ratio_without_over_with']:.1f}x")
    quality = int8_quality(args)
    print("\nint8 KV vs float32 KV (teacher-forced greedy, "
          f"{args.quality_tokens} tokens x 12 prompts)")
    for name, q in quality.items():
        print(f"{name:<24} agreement {q['greedy_agreement']:.3f}  cosine mean "
              f"{q['logit_cosine_mean']:.6f}  min {q['logit_cosine_min']:.6f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"capacity": cap, "lanes": lane, "int8_kv": quality,
                                    "command": " ".join(sys.argv),
                                    "seconds": args.seconds, "rounds": args.rounds}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
