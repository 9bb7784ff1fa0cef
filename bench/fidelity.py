"""How close a cheaper model stays to its reference: bfloat16 vs float32, and pruned tiers
(`gateway prune`, with int8 on top) vs the original, with their size and speed.

    .venv/bin/python -m bench.fidelity [--model models/demo] [--mid models/mid]

- greedy agreement: for each prompt both models generate --new tokens greedily, each on its
  own trajectory (forward_full); the share of positions where the tokens are equal (one early
  divergence costs every position after it, so this is strict);
- logit cosine: teacher-forced on the reference's trajectories, the cosine similarity of the
  two models' logits at every position (min and mean);
- size: the weight bytes the loader reports; speed: in-process engine decode tok/s at batch 8
  (64-token prompts, --new tokens), reference and candidate interleaved, medians of 3.
Prompts: the demo corpus's user turns (chat template), so a trained model answers in-domain.
Writes bench/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.hf.tokenizer import ChatTokenizer  # noqa: E402
from backends.local.commands.demo import load_dialogues  # noqa: E402
from backends.local.engine import Engine, Event  # noqa: E402
from backends.local.loader import LoadedModel, load_checkpoint  # noqa: E402
from backends.local.model import Llama  # noqa: E402
from backends.local.sampler import Sampler  # noqa: E402


def chat_prompts(model_dir: Path, n: int) -> list[list[int]]:
    tok = ChatTokenizer.from_dir(model_dir)
    users = [c for f in ("demo_base.txt", "demo_acme.txt", "demo_globex.txt")
             for d in load_dialogues(f) for r, c in d if r == "user"]
    step = max(1, len(users) // n)
    return [tok.encode_chat([{"role": "user", "content": u}]) for u in users[::step][:n]]


def trajectory(model: Llama, ids: list[int], new: int) -> list[int]:
    out = list(ids)
    with torch.inference_mode():
        for _ in range(new):
            out.append(int(model.forward_full(torch.tensor([out], device=model.device))[0, -1].argmax()))
    return out[len(ids):]


def fidelity(ref: Llama, cand: Llama, prompts: list[list[int]], new: int) -> dict[str, float]:
    agree = total = 0
    cosines = []
    for ids in prompts:
        a, b = trajectory(ref, ids, new), trajectory(cand, ids, new)
        agree += sum(x == y for x, y in zip(a, b, strict=True))
        total += new
        seq = torch.tensor([ids + a[:-1]])
        with torch.inference_mode():
            la = ref.forward_full(seq)[0, len(ids) - 1 :].float()
            lb = cand.forward_full(seq)[0, len(ids) - 1 :].float()
        cosines.append(torch.nn.functional.cosine_similarity(la, lb, dim=-1))
    cos = torch.cat(cosines)
    return {"greedy_agreement": agree / total, "cosine_min": cos.min().item(),
            "cosine_mean": cos.mean().item()}


def decode_speed(loaded: LoadedModel, prompts: list[list[int]], new: int) -> float:
    """tok/s of one batch of all `prompts` through the engine (greedy, exactly `new` each)."""
    engine = Engine(loaded.model, 64 << 20, max_batch_size=len(prompts))
    engine.start()
    done = threading.Semaphore(0)

    class Quiet:
        def push(self, token: int) -> str:
            return ""

        def flush(self) -> str:
            return ""

    def emit(ev: Event) -> None:
        if ev.finish_reason is not None or ev.error is not None:
            done.release()

    try:
        t0 = time.perf_counter()
        for ids in prompts:
            engine.submit(ids, new, Sampler(loaded.config.vocab_size, 0.0), Quiet(), emit)  # type: ignore[arg-type]
        for _ in prompts:
            done.acquire()
        return len(prompts) * new / (time.perf_counter() - t0)
    finally:
        engine.stop()


def speeds(models: dict[str, LoadedModel], prompts: list[list[int]], new: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {n: [] for n in models}
    for rep in range(3):
        for name, loaded in (list(models.items())[::-1] if rep % 2 else models.items()):
            runs[name].append(decode_speed(loaded, prompts, new))
    return {n: statistics.median(v) for n, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/demo"))
    ap.add_argument("--mid", type=Path, default=Path("models/mid"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--tiers", default="1:1.0,0:0.75,1:0.75",
                    help="drop_layers:ffn_keep,... pruned tiers of --model to measure")
    args = ap.parse_args()
    from backends.local.commands.prune import prune_checkpoint

    report: dict[str, Any] = {"command": "python -m bench.fidelity " + " ".join(sys.argv[1:]),
                              "new_tokens": args.new}
    prompts = chat_prompts(args.model, args.prompts)
    fp32 = load_checkpoint(args.model)
    report["bfloat16"] = {str(args.model): fidelity(fp32.model, load_checkpoint(
        args.model, "bfloat16").model, prompts, args.new)}
    if (args.mid / "config.json").exists():
        mid = chat_prompts(args.mid, args.prompts)
        report["bfloat16"][str(args.mid)] = fidelity(
            load_checkpoint(args.mid).model, load_checkpoint(args.mid, "bfloat16").model, mid,
            args.new)
    print(json.dumps(report["bfloat16"], indent=1), flush=True)
    tiers: dict[str, Any] = {}
    bench_prompts = [p[:64] for p in chat_prompts(args.model, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        models = {"original": fp32, "original int8": load_checkpoint(args.model, quantize="int8")}
        for spec in args.tiers.split(","):
            drop, keep = spec.split(":")
            dst = Path(tmp) / f"p{drop}-{keep}"
            rec = prune_checkpoint(args.model, dst, int(drop), float(keep), log=lambda _: None)
            for quantize in ("none", "int8"):
                name = f"drop {drop} layers, FFN x{keep}" + (" + int8" if quantize == "int8" else "")
                loaded = load_checkpoint(dst, quantize=quantize)
                models[name] = loaded
                tiers[name] = {"checkpoint": rec["name"], "dropped_layers": rec["dropped_layers"],
                               "weight_bytes": loaded.weight_bytes,
                               **fidelity(fp32.model, loaded.model, prompts, args.new)}
                print(name, tiers[name], flush=True)
        tiers["original int8"] = {"weight_bytes": models["original int8"].weight_bytes,
                                  **fidelity(fp32.model, models["original int8"].model, prompts,
                                             args.new)}
        tiers["original"] = {"weight_bytes": fp32.weight_bytes, "greedy_agreement": 1.0}
        for name, tps in speeds(models, bench_prompts, args.new).items():
            tiers[name]["decode_tok_s_batch8"] = tps
    report["pruned"] = tiers
    print("\n| tier | weights | vs original | greedy agreement | logit cosine min / mean | "
          "tok/s batch 8 |\n|---|---|---|---|---|---|")
    base = tiers["original"]
    for name, t in tiers.items():
        cos = (f"{t['cosine_min']:.4f} / {t['cosine_mean']:.4f}" if "cosine_min" in t else "1 / 1")
        print(f"| {name} | {t['weight_bytes']:,} | {t['weight_bytes'] / base['weight_bytes']:.3f}x | "
              f"{t['greedy_agreement']:.3f} | {cos} | {t['decode_tok_s_batch8']:.0f} "
              f"({t['decode_tok_s_batch8'] / base['decode_tok_s_batch8']:.2f}x) |")
    out = ROOT / "bench" / "results" / "fidelity.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
