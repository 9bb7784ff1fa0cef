"""Decode steps of one checkpoint in two dtypes, side by side in one process.

    .venv/bin/python -m bench.step_ab --model models/mid [--dtypes float32,bfloat16]

Both models load in this process; one engine-like thread (placed as an engine's: its own
OpenMP team of --threads, every other thread on one) runs `forward_step` on batches of B
decoding sequences at a context of --context tokens, the dtypes alternating in rounds of
--steps steps, so both see the same minutes of a shared machine. No scheduler, sampling or
detokenizing: the model's step alone. --adapters N mixes N adapters of MODEL/adapters in
each batch. --idle-team N first starts a thread that runs one parallel op on N threads and
then waits, as the thread that loaded the model did before placement.py kept every other
thread on one: its idle OpenMP team is what made libgomp's barriers sleep. Prints median ms
per step (and the speed ratio of two dtypes); writes
bench/results/step-ab-<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/mid"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--adapters", type=int, default=0)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="default: the engine's (auto)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--idle-team", type=int, default=0, metavar="N")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from backends.local import placement

    placement.prepare_process()  # as `gateway serve`: before torch loads
    import torch

    from backends.local.attention import DecodeBatch
    from backends.local.loader import load_checkpoint
    from backends.local.lora import install, load_adapter
    from backends.local.model import KVPool, StepInput
    from backends.local.projection import LoraBatch

    dtypes = args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    threads = placement.resolve_threads(args.threads)
    blocks = args.context // 16 + 1
    models, pools = {}, {}
    for d in dtypes:
        model = load_checkpoint(args.model, d, "cpu").model
        if args.adapters:
            paths = sorted(p for p in (args.model / "adapters").iterdir()
                           if (p / "adapter_config.json").exists())[: args.adapters]
            for slot, path in enumerate(paths, start=1):
                install(model, load_adapter(path, model), slot)
        models[d] = model
        pools[d] = KVPool.allocate(model.config, max(batches) * blocks * 16, model.compute_dtype,
                                   "cpu")
    cpu = torch.device("cpu")

    def step(b: int) -> Any:
        tables = [[i * blocks + j for j in range(blocks)] for i in range(b)]
        lora = (LoraBatch.from_slots([1 + i % args.adapters for i in range(b)], cpu)
                if args.adapters else None)
        return StepInput(
            input_ids=torch.randint(0, models[dtypes[0]].config.vocab_size, (b,)),
            positions=torch.full((b,), args.context),
            write_slots=torch.tensor([t[-1] * 16 + args.context % 16 for t in tables]),
            seqs=[], logits_rows=torch.arange(b), lora=lora,
            decode=DecodeBatch.from_tables(list(range(b)), tables, [args.context + 1] * b, 16,
                                           cpu),
        )

    results: dict[int, dict[str, list[float]]] = {}

    def run() -> None:
        placement.enter_engine_thread(threads)
        with torch.inference_mode():
            for b in batches:
                # one set per dtype (a LoraBatch caches its column weights in one dtype)
                steps = {d: [step(b) for _ in range(args.steps)] for d in dtypes}
                results[b] = {d: [] for d in dtypes}
                for r in range(args.rounds):
                    for d in dtypes if r % 2 == 0 else dtypes[::-1]:
                        for s in steps[d][:2]:  # warm: the other dtype ran last
                            models[d].forward_step(s, pools[d])
                        t0 = time.perf_counter()
                        for s in steps[d]:
                            models[d].forward_step(s, pools[d])
                        results[b][d].append((time.perf_counter() - t0) / args.steps * 1e3)

    finished = threading.Event()

    def idle() -> None:
        torch.set_num_threads(args.idle_team)
        torch.ones(1 << 22).mul_(2.0)  # a parallel region: this thread's team now exists
        finished.wait()

    idler = threading.Thread(target=idle, daemon=True)
    if args.idle_team:
        idler.start()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    finished.set()
    med = {b: {d: statistics.median(v) for d, v in r.items()} for b, r in results.items()}
    pair = len(dtypes) == 2
    head = "| batch | " + " | ".join(f"{d} ms/step" for d in dtypes)
    head += f" | {dtypes[1]} speed / {dtypes[0]} |" if pair else " |"
    lines = [head, "|---|" + "---|" * (len(dtypes) + pair)]
    for b in batches:
        row = f"| {b} | " + " | ".join(f"{med[b][d]:.2f}" for d in dtypes)
        row += f" | {med[b][dtypes[0]] / med[b][dtypes[1]]:.2f}x |" if pair else " |"
        lines.append(row)
    table = "\n".join(lines)
    print(f"{args.model}: decode steps at context {args.context}, {args.adapters or 'no'} "
          f"adapters, {threads} threads, idle team {args.idle_team or 'none'}, medians of "
          f"{args.rounds} rounds of {args.steps}\n{table}")
    out = args.out or ROOT / "bench" / "results" / f"step-ab-{args.model.name}.json"
    out.write_text(json.dumps({
        "command": " ".join(["python", "-m", "bench.step_ab", *sys.argv[1:]]),
        "threads": threads, "context": args.context, "adapters": args.adapters,
        "idle_team": args.idle_team,
        "table": table, "ms_per_step": {str(b): r for b, r in results.items()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
