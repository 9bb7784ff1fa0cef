"""Weight formats side by side on one model: float32 / bfloat16 / int8 checkpoint / int8 at load.

`python -m bench.formats --model models/big` (`make bench-formats`; `make big-model` first).
Each format runs in a process of its own (so its RSS and PSS are its own), in the engine
thread as `gateway serve` runs it (placement, 256 MiB KV pool, the 8 adapters installed):

- bytes on disk (the checkpoint files the format maps), RSS and PSS after the runs, and the
  ledger's weight components (mapped / heap / source pages that serve nothing);
- tok/s at batch 1, batch 8, and batch 8 with 8 adapters mixed (greedy, `--prompt` tokens,
  `--new` tokens each, all submitted at once, prefill included; median of `--repeats`);
- the machine's read bandwidth (the sum of a 1 GiB float32 tensor on two threads, measured
  in this run) and each format's batch-1 bound, bandwidth / weight bytes per token, and the
  fraction of it reached;
- teacher-forced fidelity against float32: greedy agreement (argmax under the engine tests'
  margin rule: positions where float32's top-2 margin is under `MARGIN` are not counted) and
  the mean logit cosine, over fixed prompts.

Prints a table and writes bench/results/formats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORMATS: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32", "quantize": "none", "source": "model"},
    "bfloat16": {"dtype": "bfloat16", "quantize": "none", "source": "model"},
    "int8 checkpoint": {"dtype": "bfloat16", "quantize": "none", "source": "int8"},
    "int8 at load": {"dtype": "bfloat16", "quantize": "int8", "source": "model"},
}
MARGIN = 1e-2  # float32 top-2 margins below this are too close to call (tests' margin rule)
RESULTS = Path(__file__).parent / "results" / "formats.json"


def bandwidth(threads: int = 2, gib: float = 1.0) -> float:
    """Bytes per second of a sum over a `gib` GiB float32 tensor (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def target(args: argparse.Namespace) -> None:
    """One format in this process: load, run the cells, report one JSON line."""
    from backends.local.placement import prepare_process

    prepare_process()
    import threading

    import torch

    from backends.hf.tokenizer import ChatTokenizer
    from backends.local.engine import Engine, Event
    from backends.local.loader import load_checkpoint
    from backends.local.lora import install, load_adapter
    from backends.local.runtime_memory import release_free_heap
    from bench.engine_targets import adapter_dirs
    from gateway.core.procmem import read_process_memory

    model = Path(args.model)
    loaded = load_checkpoint(model, args.dtype, "cpu", args.quantize)
    vocab = loaded.config.vocab_size
    tok = ChatTokenizer.from_dir(model, loaded.config.eos_token_ids)
    adapters = adapter_dirs(Path(args.adapters))
    for slot, path in enumerate(adapters, start=1):
        install(loaded.model, load_adapter(path, loaded.model), slot)
    engine = Engine(loaded.model, 256 << 20, max_batch_size=8, num_threads=args.threads)
    engine.start()
    from backends.local.sampler import Sampler

    def run(batch: int, n_adapters: int) -> float:
        done = threading.Semaphore(0)
        errors: list[BaseException] = []

        def emit(ev: Event) -> None:
            if ev.error is not None:
                errors.append(ev.error)
            if ev.finish_reason is not None or ev.error is not None:
                done.release()

        t0 = time.perf_counter()
        for i in range(batch):
            ids = [(31 * i + 7 * j + 3) % (vocab - 10) + 5 for j in range(args.prompt)]
            slot = 1 + i % n_adapters if n_adapters else 0
            engine.submit(
                ids, args.new, Sampler(vocab, 0.0), tok.detokenizer(ids), emit, adapter_slot=slot
            )
        for _ in range(batch):
            done.acquire()
        if errors:
            raise errors[0]
        return batch * args.new / (time.perf_counter() - t0)

    run(1, 0)  # warm-up
    cells = {"b1": (1, 0), "b8": (8, 0), "b8_8adapters": (8, len(adapters))}
    speed = {
        name: statistics.median(run(*cell) for _ in range(args.repeats))
        for name, cell in cells.items()
    }
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab - 5, (4, args.prompt), generator=gen)
    with torch.inference_mode():
        logits = loaded.model.forward_full(ids).float()
    torch.save(logits, args.logits)
    release_free_heap()
    pm = read_process_memory()
    engine.stop()
    print(
        json.dumps(
            {
                "tok_s": speed,
                "rss": pm.rss,
                "pss": pm.pss,
                "weight_bytes": loaded.weight_bytes,
                "mapped_bytes": loaded.mapped_bytes,
                "heap_bytes": loaded.heap_bytes,
                "source_resident_bytes": loaded.source_resident_bytes(),
                "kernels": loaded.kernels,
                "threads": engine.num_threads,
                "kv_bytes": engine.kv_bytes_total,
            }
        ),
        flush=True,
    )


def fidelity(ref_path: str, path: str) -> dict[str, float]:
    import torch

    ref, got = torch.load(ref_path), torch.load(path)
    top2 = ref.topk(2, dim=-1).values
    sure = (top2[..., 0] - top2[..., 1]) > MARGIN
    agree = (ref.argmax(-1) == got.argmax(-1))[sure].float().mean().item()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), got.flatten(0, 1), dim=-1)
    return {
        "greedy_agreement": agree,
        "logit_cosine": cos.mean().item(),
        "positions": int(sure.sum()),
    }


def disk_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/big")
    ap.add_argument(
        "--int8",
        default=None,
        help="the int8 checkpoint (default: MODEL-int8, "
        "written by `gateway quantize` when missing)",
    )
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    # internal: one format's process
    ap.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.target:
        target(args)
        return
    model = Path(args.model)
    int8 = Path(args.int8) if args.int8 else model.with_name(model.name + "-int8")
    names = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; expected some of {list(FORMATS)}")
    if "int8 checkpoint" in names and not (int8 / "config.json").exists():
        from backends.local.commands.quantize import quantize_checkpoint

        quantize_checkpoint(model, int8)
    bw = bandwidth()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            fmt = FORMATS[name]
            src = int8 if fmt["source"] == "int8" else model
            logits = os.path.join(tmp, f"{len(rows)}.pt")
            cmd = [
                sys.executable,
                "-m",
                "bench.formats",
                "--target",
                "--model",
                str(src),
                "--adapters",
                str(model),
                "--dtype",
                fmt["dtype"],
                "--quantize",
                fmt["quantize"],
                "--logits",
                logits,
                "--prompt",
                str(args.prompt),
                "--new",
                str(args.new),
                "--repeats",
                str(args.repeats),
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["disk_bytes"] = disk_bytes(src)
            row["logits"] = logits
            per_token = row["weight_bytes"]
            row["bound_b1_tok_s"] = bw / per_token
            row["fraction_of_bound"] = row["tok_s"]["b1"] / row["bound_b1_tok_s"]
            rows[name] = row
            print(f"{name}: done", file=sys.stderr, flush=True)
        ref = rows["float32"]["logits"] if "float32" in rows else None  # the reference
        for row in rows.values():
            logits = row.pop("logits")
            if ref is not None:
                row.update(fidelity(ref, logits))
    report = {
        "model": str(model),
        "bandwidth_bytes_s": bw,
        "prompt": args.prompt,
        "new": args.new,
        "repeats": args.repeats,
        "formats": rows,
        "machine": f"{os.cpu_count()} vCPU",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    mb = 1e6
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (1 GiB float32 sum, 2 threads)")
    print(
        "| format | disk MB | RSS MB | PSS MB | weights MB (mapped/heap/source) | b1 tok/s | "
        "b8 tok/s | b8+8 adapters tok/s | b1 bound | of bound | agreement | cosine |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        w = (
            f"{r['mapped_bytes'] / mb:.0f}/{r['heap_bytes'] / mb:.0f}/"
            f"{(r['source_resident_bytes'] or 0) / mb:.0f}"
        )
        t = r["tok_s"]
        print(
            f"| {name} | {r['disk_bytes'] / mb:,.0f} | {r['rss'] / mb:,.0f} | "
            f"{r['pss'] / mb:,.0f} | {w} | {t['b1']:.1f} | {t['b8']:.1f} | "
            f"{t['b8_8adapters']:.1f} | {r['bound_b1_tok_s']:.1f} | "
            f"{r['fraction_of_bound']:.2f} | {r.get('greedy_agreement', float('nan')):.3f} | "
            f"{r.get('logit_cosine', float('nan')):.4f} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
