"""Engine throughput: prefill and decode tokens/s at batch 1, 8, 32; one adapter vs 8 mixed.

Side by side in one run on the same model and requests: the local engine, and transformers +
peft (mixed batches through `adapter_names`). vLLM is measured only when importable here.
Writes bench/results/engine.json.  Run: `.venv/bin/python -m bench.engine [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from backends.local.engine import Engine, Event
from backends.local.loader import load_checkpoint
from backends.local.lora import install, load_adapter
from backends.local.sampler import Sampler

MODEL = Path("models/demo")
RESULTS = Path("bench/results")


def make_adapters(root: Path, n: int) -> list[Path]:
    """n random adapters shaped like the demo's acme-support."""
    src = MODEL / "adapters" / "acme-support"
    base = load_file(str(src / "adapter_model.safetensors"))
    out = []
    for i in range(n):
        d = root / f"rand-{i}"
        d.mkdir(parents=True)
        shutil.copy(src / "adapter_config.json", d)
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in base.items()},
            str(d / "adapter_model.safetensors"),
        )
        out.append(d)
    return out


class Detok:
    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def run_ours(engine: Engine, prompts: list[list[int]], slots: list[int], new: int) -> float:
    """Seconds until every sequence of one batch (submitted at once) has finished."""
    done = threading.Semaphore(0)

    def emit(ev: Event) -> None:
        if ev.finish_reason is not None or ev.error is not None:
            done.release()

    t0 = time.perf_counter()
    for p, s in zip(prompts, slots, strict=True):
        engine.submit(p, new, Sampler(2048, 0.0), Detok(), emit, adapter_slot=s)  # type: ignore[arg-type]
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - t0


def decode_rate(tokens: int, seconds: float) -> float:
    """Decode tok/s from (all - prefill-only) time; NaN when noise makes that non-positive."""
    return tokens / seconds if seconds > 0 else float("nan")


def bench_ours(batch: int, adapters: int, new: int, plen: int, paths: list[Path]) -> dict[str, float]:
    loaded = load_checkpoint(MODEL)
    for i, p in enumerate(paths[:adapters]):
        install(loaded.model, load_adapter(p, loaded.model), i + 1)
    engine = Engine(loaded.model, 256 << 20, max_batch_size=64, max_prefill_tokens=4096)
    engine.start()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 2048, (plen,), generator=g).tolist() for _ in range(batch)]
    slots = [1 + i % adapters for i in range(batch)]
    try:
        run_ours(engine, prompts[:1], slots[:1], 2)  # warm-up
        t_one = run_ours(engine, prompts, slots, 1)  # prefill (+ one sample)
        t_all = run_ours(engine, prompts, slots, new)
    finally:
        engine.stop()
    return {
        "prefill_tok_s": batch * plen / t_one,
        "decode_tok_s": decode_rate(batch * (new - 1), t_all - t_one),
    }


def bench_hf(batch: int, adapters: int, new: int, plen: int, paths: list[Path]) -> dict[str, float]:
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(MODEL)).eval()
    pm = peft.PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    for i in range(1, adapters):
        pm.load_adapter(str(paths[i]), adapter_name=f"a{i}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 2048, (batch, plen), generator=g)
    names = [f"a{i % adapters}" for i in range(batch)]
    kw = {"do_sample": False, "pad_token_id": 1, "eos_token_id": None}
    with torch.inference_mode():
        pm.generate(ids[:1], max_new_tokens=2, adapter_names=names[:1], **kw)
        t0 = time.perf_counter()
        pm.generate(ids, max_new_tokens=1, min_new_tokens=1, adapter_names=names, **kw)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pm.generate(ids, max_new_tokens=new, min_new_tokens=new, adapter_names=names, **kw)
        t_all = time.perf_counter() - t0
    return {
        "prefill_tok_s": batch * plen / t_one,
        "decode_tok_s": decode_rate(batch * (new - 1), t_all - t_one),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8 only, fewer tokens")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    batches = (1, 8) if args.quick else (1, 8, 32)
    new, plen = (8, 32) if args.quick else (32, 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), 8)
        for batch in batches:
            for adapters in (1, 8):
                for name, fn in (("memgate", bench_ours), ("hf+peft", bench_hf)):
                    r = fn(batch, adapters, new, plen, paths)
                    rows.append({"engine": name, "batch": batch, "adapters": adapters, **r})
                    print(
                        f"{name:<8} batch {batch:>2} adapters {adapters}  "
                        f"prefill {r['prefill_tok_s']:>9.0f} tok/s  "
                        f"decode {r['decode_tok_s']:>8.0f} tok/s",
                        flush=True,
                    )
    try:
        import vllm  # noqa: F401

        print("vllm is importable, but its CPU bench is not wired here yet")
    except ImportError:
        print("vllm: not installed in this environment; skipped")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"prompt_tokens": plen, "new_tokens": new, "threads": torch.get_num_threads()}
    (RESULTS / "engine.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS / 'engine.json'}")


if __name__ == "__main__":
    main()
