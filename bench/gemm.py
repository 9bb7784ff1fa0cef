"""Projection GEMMs by dtype and batch rows: why bfloat16 wins or loses on this CPU.

    .venv/bin/python -m bench.gemm [--threads 1] [--repeats 7]

The mid-size model's projections (8 layers of q, k, v, o, gate, up, down: 512 ->
512/128/128/512/1408/1408, 1408 -> 512; 90 MB in float32, so not cache-resident) at M rows: float32 `F.linear` (MKL), bfloat16 `F.linear` (oneDNN, plain weight
reordered per call), bfloat16 packed once (`torch.ops.mkldnn`, what `dtype: bfloat16` serves
on CPU), and the packed weight upcast to float32 per call. Interleaved, medians of --repeats.
Writes bench/results/gemm.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(512, 512), (128, 512), (128, 512), (512, 512), (1408, 512), (1408, 512), (512, 1408)]
ROWS = (1, 8, 16, 32, 64, 128, 512)
LAYERS = 8


def timed(fn: Callable[[], object], n: int = 2) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from backends.local import placement

    torch.set_num_threads(placement.resolve_threads(args.threads))
    placement.tune_malloc()
    g = torch.Generator().manual_seed(0)
    w32 = [torch.randn(o, i, generator=g) * 0.02 for _ in range(LAYERS) for o, i in SHAPES]
    w16 = [w.bfloat16() for w in w32]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in w16]

    def pk(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")
        return y

    def variants(x32: dict[int, torch.Tensor]) -> dict[str, Callable[[], object]]:
        x16 = {i: t.bfloat16() for i, t in x32.items()}
        pairs = list(zip(w16, packed, strict=True))
        return {
            "float32": lambda: [F.linear(x32[w.shape[1]], w) for w in w32],
            "bf16 plain": lambda: [F.linear(x16[w.shape[1]], w) for w in w16],
            "bf16 packed": lambda: [pk(x16[w.shape[1]], p) for w, p in pairs],
            "bf16 packed, upcast": lambda: [
                F.linear(x16[w.shape[1]].float(), p.to_dense(torch.float32)).bfloat16()
                for w, p in pairs],
        }

    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for m in ROWS:
            x32 = {i: torch.randn(m, i, generator=g) for i in (512, 1408)}
            for name, fn in variants(x32).items():
                runs.setdefault(f"{m}|{name}", []).append(timed(fn) * 1e3)
    names = ["float32", "bf16 plain", "bf16 packed", "bf16 packed, upcast"]
    print(f"{LAYERS} layers' projections, ms, {args.threads} thread(s), "
          f"medians of {args.repeats}")
    print("| rows | " + " | ".join(names) + " | packed / float32 |\n|---|---|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in runs.items()}
    for m in ROWS:
        row = [med[f"{m}|{n}"] for n in names]
        print(f"| {m} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {row[2] / row[0]:.2f} |")
    out = ROOT / "bench" / "results" / "gemm.json"
    out.write_text(json.dumps({"command": "python -m bench.gemm " + " ".join(sys.argv[1:]),
                               "threads": args.threads, "medians_ms": med, "runs_ms": runs},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
