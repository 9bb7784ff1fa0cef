"""The targets `bench/engine.py` drives, each in its own process (`python -m bench.engine_targets
memgate|hf --model DIR --dtype D`): one JSON request per stdin line, one JSON answer per
stdout line, so the driver can interleave targets and repeat cells without reloading models.

A request: {"batch": B, "adapters": 0 | n, "new": T, "prompts": [[ids], ...]}; the answer:
{"seconds": wall time from submitting the batch to its last token, "cpu": this process's CPU
seconds over the same span (every thread), "tokens": tokens made}.
Every request of a batch is submitted at once, greedy, exactly `new` tokens (EOS ignored).
`adapters: n` serves request i with adapter rand-(i mod n) of DIR/adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def adapter_dirs(model: Path) -> list[Path]:
    root = model / "adapters"
    return sorted(p for p in root.iterdir() if (p / "adapter_config.json").exists())


class Memgate:
    """The local engine in this process: the engine thread, real detokenizers, greedy."""

    def __init__(
        self, model: Path, dtype: str, threads: int | None, batch: int, device: str
    ) -> None:
        from backends.hf.tokenizer import ChatTokenizer
        from backends.local.engine import Engine
        from backends.local.loader import load_checkpoint
        from backends.local.lora import install, load_adapter

        loaded = load_checkpoint(model, dtype, device)
        self.vocab = loaded.config.vocab_size
        self.tok = ChatTokenizer.from_dir(model, loaded.config.eos_token_ids)
        for slot, path in enumerate(adapter_dirs(model), start=1):
            install(loaded.model, load_adapter(path, loaded.model), slot)
        self.engine = Engine(loaded.model, 256 << 20, max_batch_size=batch, device=device,
                             num_threads=threads)
        self.engine.start()
        self.threads = self.engine.num_threads

    def resizes(self) -> int:
        """Team resizes so far (the engine shrinks its team while other processes hold cores)."""
        return int(self.engine.thread_changes)

    def run(self, prompts: list[list[int]], adapters: int, new: int) -> float:
        from backends.local.engine import Event
        from backends.local.sampler import Sampler

        done = threading.Semaphore(0)
        failures: list[BaseException] = []

        def emit(ev: Event) -> None:
            if ev.error is not None:
                failures.append(ev.error)
            if ev.finish_reason is not None or ev.error is not None:
                done.release()

        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):
            slot = 1 + i % adapters if adapters else 0
            self.engine.submit(ids, new, Sampler(self.vocab, 0.0), self.tok.detokenizer(ids), emit,
                               adapter_slot=slot)
        for _ in prompts:
            done.acquire()
        if failures:
            raise failures[0]
        return time.perf_counter() - t0


class Transformers:
    """transformers `generate` (greedy, SDPA); with adapters, peft with `adapter_names`."""

    def __init__(self, model: Path, dtype: str, threads: int | None, device: str) -> None:
        import peft
        import torch
        import transformers

        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.device = torch.device(device)
        load = transformers.LlamaForCausalLM.from_pretrained
        self.plain = load(str(model), dtype=getattr(torch, dtype)).eval().to(self.device)
        paths = adapter_dirs(model)
        base = load(str(model), dtype=getattr(torch, dtype)).eval()
        self.peft = peft.PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0").eval()
        for i, p in enumerate(paths[1:], start=1):
            self.peft.load_adapter(str(p), adapter_name=f"a{i}")
        self.peft.to(self.device)

    def resizes(self) -> int:
        return 0  # torch's own thread pool: never resized

    def run(self, prompts: list[list[int]], adapters: int, new: int) -> float:
        import torch

        ids = torch.tensor(prompts, device=self.device)
        kw: dict[str, Any] = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                              "pad_token_id": 1, "eos_token_id": None}
        with torch.inference_mode():
            t0 = time.perf_counter()
            if adapters:
                names = [f"a{i % adapters}" for i in range(len(prompts))]
                out = self.peft.generate(input_ids=ids, adapter_names=names, **kw)
            else:
                out = self.plain.generate(ids, **kw)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        if out.shape[1] != ids.shape[1] + new:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new}")
        return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", choices=("memgate", "hf"))
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.target == "memgate":  # as `gateway serve` does, before torch loads
        from backends.local.placement import prepare_process

        prepare_process()
    target: Memgate | Transformers = (
        Memgate(args.model, args.dtype, args.threads, args.max_batch, args.device)
        if args.target == "memgate"
        else Transformers(args.model, args.dtype, args.threads, args.device)
    )
    print(json.dumps({"ready": True, "threads": target.threads}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        cpu = time.process_time()
        resized = target.resizes()
        seconds = target.run(req["prompts"], req["adapters"], req["new"])
        cpu = time.process_time() - cpu
        resized = target.resizes() - resized
        print(json.dumps({"seconds": seconds, "cpu": cpu, "resizes": resized,
                          "tokens": len(req["prompts"]) * req["new"]}), flush=True)


if __name__ == "__main__":
    main()
