"""Memory: worker sharing of mmapped weights, float32 vs int8, KV ledger vs arithmetic, a burst.

1. PSS / Private of the mmapped model.safetensors in each worker of `gateway serve --workers N`
   (N = 1 and 4), read from /proc/PID/smaps after every worker has served requests.
2. Weight bytes float32 vs int8 (`gateway quantize`), greedy agreement and logit cosine.
3. KV bytes per request from the ledger (ctx.memory) vs block arithmetic (memory_plan).
4. Peak RSS during a 64-request burst vs the budget (runtime + weights + KV + adapters + workspace).
Writes bench/results/memory.json.  Run: `.venv/bin/python -m bench.memory`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MODEL = Path("models/demo").resolve()
RESULTS = Path("bench/results")
ACME_KEY = "sk-demo-acme"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mapping_kib(pid: int, path: str) -> dict[str, int]:
    """Rss/Pss/Private kB of the mappings of `path` in process `pid` (from /proc/PID/smaps)."""
    out = {"Rss": 0, "Pss": 0, "Private": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and parts[5] == path
                continue
            if inside and parts[0] in ("Rss:", "Pss:"):
                out[parts[0][:-1]] += int(parts[1])
            elif inside and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                out["Private"] += int(parts[1])
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def workers_pss(n: int) -> list[dict[str, int]]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", "examples/demo.yaml",
           "--port", str(port), "--workers", str(n)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        hdr = {"Authorization": f"Bearer {ACME_KEY}"}
        for _ in range(8 * n):  # a new connection each: spread over the workers
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=hdr, timeout=60)
        pids = children(proc.pid) if n > 1 else [proc.pid]
        weights = str(MODEL / "model.safetensors")
        return [{"pid": p, **mapping_kib(p, weights)} for p in pids]
    finally:
        proc.terminate()
        proc.wait(30)


def weights_int8() -> dict[str, float]:
    from backends.local.commands.quantize import quantize_checkpoint
    from backends.local.loader import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        dst = quantize_checkpoint(MODEL, Path(tmp) / "q8")
        fp, q8 = load_checkpoint(MODEL), load_checkpoint(dst)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 2048, (8, 64), generator=g)
        with torch.inference_mode():
            a, b = fp.model.forward_full(ids), q8.model.forward_full(ids)
            cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
            agree = total = 0
            for row in ids[:, :8].tolist():
                x, y = list(row), list(row)
                for _ in range(32):
                    x.append(int(fp.model.forward_full(torch.tensor([x]))[0, -1].argmax()))
                    y.append(int(q8.model.forward_full(torch.tensor([y]))[0, -1].argmax()))
                agree += sum(p == q for p, q in zip(x[8:], y[8:], strict=True))
                total += 32
    return {"float32_bytes": fp.weight_bytes, "int8_bytes": q8.weight_bytes,
            "ratio": q8.weight_bytes / fp.weight_bytes, "greedy_agreement": agree / total,
            "cosine_min": cos.min().item(), "cosine_mean": cos.mean().item()}


async def burst() -> dict[str, object]:
    from backends.local.backend import LocalBackend, LocalConfig
    from backends.local.memory_plan import plan_for_config
    from backends.local.runtime_memory import resident_bytes
    from gateway.core.context import RequestContext, SamplingParams

    cfg = LocalConfig(model=str(MODEL), adapters_dir=str(MODEL / "adapters"),
                      kv_cache_bytes=64 << 20, adapter_cache_bytes=16 << 20, max_batch_size=32)
    b = LocalBackend("local", cfg)
    await b.start()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], resident_bytes() or 0)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    adapters = [None, "acme-support", "globex-legal"]
    ctxs = [RequestContext(request_id=str(i), tenant="t", kind="completion", requested_model="m",
                           target_model="m", backend="local", adapter=adapters[i % 3],
                           prompt="The memory budget " * (1 + i % 8),
                           sampling=SamplingParams(max_tokens=16 + i % 32, temperature=0.0,
                                                   ignore_eos=True))
            for i in range(64)]

    async def run(ctx: RequestContext) -> None:
        async for _ in b.generate(ctx):
            pass

    await asyncio.gather(*[run(c) for c in ctxs])
    stop.set()
    t.join()
    mem = b.memory()
    plan = plan_for_config(cfg)
    kv_rows = [{"prompt": c.prompt_tokens, "max_tokens": c.sampling.max_tokens,
                "ledger_reserved": c.memory.kv_bytes_reserved, "ledger_peak": c.memory.kv_bytes_peak,
                "arith_reserved": plan.kv.kv_bytes_for((c.prompt_tokens or 0) + c.sampling.max_tokens),
                "arith_peak": plan.kv.kv_bytes_for((c.prompt_tokens or 0) + c.sampling.max_tokens - 1)}
               for c in ctxs[:6]]
    budget = mem.runtime + mem.weights + cfg.kv_cache_bytes + cfg.adapter_cache_bytes + mem.workspace
    await b.aclose()
    return {"peak_rss": peak[0], "budget": budget, "runtime": mem.runtime,
            "workspace_peak": mem.workspace, "other_after": mem.other, "kv": kv_rows}


def main() -> None:
    mib = 1 << 20
    out: dict[str, object] = {}
    q = weights_int8()
    out["weights"] = q
    print(f"weights float32 {q['float32_bytes']:,} B  int8 {q['int8_bytes']:,} B  "
          f"ratio {q['ratio']:.3f}  greedy agreement {q['greedy_agreement']:.3f}  "
          f"logit cosine min {q['cosine_min']:.5f} mean {q['cosine_mean']:.5f}")
    r = asyncio.run(burst())
    out["burst"] = r
    print("KV per request: prompt max_tokens | ledger reserved/peak | arithmetic reserved/peak")
    for k in r["kv"]:  # type: ignore[union-attr]
        print(f"  {k['prompt']:>4} {k['max_tokens']:>4} | {k['ledger_reserved']:>7} "
              f"{k['ledger_peak']:>7} | {k['arith_reserved']:>7} {k['arith_peak']:>7}")
    print(f"64-request burst: peak RSS {r['peak_rss'] / mib:.1f} MiB vs budget "
          f"{r['budget'] / mib:.1f} MiB (runtime {r['runtime'] / mib:.1f} MiB)")
    weight_kib = os.path.getsize(MODEL / "model.safetensors") // 1024
    for n in (1, 4):
        rows = workers_pss(n)
        out[f"workers_{n}"] = rows
        print(f"--workers {n}: weights file {weight_kib} KiB")
        for row in rows:
            print(f"  pid {row['pid']}: Rss {row['Rss']} KiB  Pss {row['Pss']} KiB  "
                  f"Private {row['Private']} KiB ({100 * row['Private'] / weight_kib:.1f}% of weights)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {RESULTS / 'memory.json'}")


if __name__ == "__main__":
    main()
