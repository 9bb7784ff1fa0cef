"""Grammar-constrained decoding: llguidance vs xgrammar, per-token overhead at batch 8.

Side by side in one run on the demo model (models/demo), rounds interleaved:
- `mask`: each library's cost per token of one sequence (the next-token mask as a bool tensor
  over the model's vocabulary, then taking the token), walking 8 matchers along random valid
  paths through a bounded JSON schema; the same conversion for both; `xgrammar+guards` is the
  engine's Constraint as shipped (also keeping the bytes UTF-8, no control characters);
- `engine`: 8 requests decoded together by the local engine (the Sampler path the gateway
  uses), free and constrained by each library: milliseconds per decode step at batch 8, and
  the overhead per token against the free run.

xgrammar is what the engine uses (backends/local/grammar.py); llguidance, the other choice,
is the `grammar-bench` extra: `.venv/bin/pip install -e '.[grammar-bench]'` then
`.venv/bin/python -m bench.grammar`. Writes bench/results/grammar.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from backends.hf.tokenizer import ChatTokenizer
from backends.local.engine import Engine, Event
from backends.local.grammar import Constraint, GrammarLimits, Grammars, json_grammar
from backends.local.loader import load_checkpoint
from backends.local.logits import Processors
from backends.local.sampler import Sampler
from backends.local.utf8 import Utf8Table

MODEL = Path("models/demo")
RESULTS = Path("bench/results")
BATCH = 8
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "tags", "status", "count"],
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "status": {"enum": ["open", "closed", "pending"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
}


class LlguidanceConstraint:
    """llguidance behind the two methods of backends/local/grammar.Constraint: the mask
    filled in place into a preallocated buffer (its fastest path), the same conversion."""

    def __init__(self, matcher: Any, vocab: int, words: int) -> None:
        self.matcher, self.vocab, self.words = matcher, vocab, words
        self.bits = np.zeros(max(words, (vocab + 31) // 32), dtype=np.uint32)

    def allowed(self) -> torch.Tensor:
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.words * 4)
        bits = np.unpackbits(self.bits.view(np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab].astype(np.bool_))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


def llguidance_factory(vocab: int, tok: ChatTokenizer) -> Any:
    import llguidance as llg

    lltok = llg.LLTokenizer(tok.tokenizer.to_str(), eos_token=sorted(tok.eos_token_ids))
    grammar = llg.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults=cast(Any, {"whitespace_flexible": False}))
    template = llg.LLMatcher(lltok, grammar)
    words = (lltok.vocab_size + 31) // 32
    return lambda: LlguidanceConstraint(template.deep_copy(), vocab, words)


def xgrammar_factory(vocab: int, tok: ChatTokenizer) -> Any:
    """(the library alone, as llguidance is measured; the engine's Constraint as shipped,
    with its UTF-8 and control-character guards)."""
    import xgrammar as xgr

    grammars = Grammars(tok.tokenizer, vocab, sorted(tok.eos_token_ids), GrammarLimits())
    key = json_grammar(SCHEMA)
    asyncio.run(grammars.constraint(key, "bench"))  # compiled once (the engine's path), cached
    compiled = grammars.cached(key)
    bare = Utf8Table([b"x"] * vocab, vocab, [])  # every token valid: no guard
    return (lambda: Constraint(xgr.GrammarMatcher(compiled), vocab, grammars.eos_ids, bare),
            lambda: Constraint(xgr.GrammarMatcher(compiled), vocab, grammars.eos_ids,
                               grammars.utf8, grammars.controls))


def mask_cost(make: Any, tokens: int, seed: int) -> float:
    """Seconds per token: mask + take, 8 matchers in turn, random valid tokens (restart a
    matcher when its JSON is complete)."""
    rng = random.Random(seed)
    matchers = [make() for _ in range(BATCH)]
    spent = 0.0
    for step in range(tokens):
        i = step % BATCH
        t0 = time.perf_counter()
        allowed = matchers[i].allowed()
        ids = torch.nonzero(allowed).flatten().tolist()
        spent += time.perf_counter() - t0
        token = rng.choice(ids)
        if token == 3:  # the JSON is complete: a fresh matcher
            matchers[i] = make()
            continue
        t0 = time.perf_counter()
        matchers[i].accept(token)
        spent += time.perf_counter() - t0
    return spent / tokens


def engine_run(engine: Engine, prompt: list[int], make: Any | None, new: int, vocab: int
               ) -> tuple[float, int]:
    """8 requests at once; (seconds, decode steps) until all ended."""
    done = threading.Semaphore(0)

    def emit(ev: Event) -> None:
        if ev.finish_reason is not None or ev.error is not None:
            done.release()

    class Detok:
        def push(self, token: int) -> str:
            return ""

        def flush(self) -> str:
            return ""

    steps0 = engine.steps
    t0 = time.perf_counter()
    for i in range(BATCH):
        proc = Processors(vocab, constraint=make()) if make is not None else None
        sampler = Sampler(vocab, temperature=1.0, seed=i, processors=proc)
        engine.submit(prompt, new, sampler, Detok(), emit, eos_ids=frozenset({3}))  # type: ignore[arg-type]
    for _ in range(BATCH):
        done.acquire()
    return time.perf_counter() - t0, engine.steps - steps0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4000, help="tokens per mask-cost round")
    ap.add_argument("--new", type=int, default=48, help="tokens per request in the engine run")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_checkpoint(str(MODEL), "float32", "cpu", "none")
    tok = ChatTokenizer.from_dir(MODEL, loaded.config.eos_token_ids)
    vocab = loaded.config.vocab_size
    bare, shipped = xgrammar_factory(vocab, tok)
    libs = {"xgrammar": bare, "xgrammar+guards": shipped}
    try:
        libs["llguidance"] = llguidance_factory(vocab, tok)
    except ImportError as exc:
        print(f"llguidance not importable ({exc}); measuring xgrammar only")
    engine = Engine(loaded.model, 64 * 2**20, max_batch_size=BATCH)
    engine.start()
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a ticket as JSON."}])
    mask: dict[str, list[float]] = {name: [] for name in libs}
    step_ms: dict[str, list[float]] = {name: [] for name in ["free", *libs]}
    try:
        engine_run(engine, prompt, None, 8, vocab)  # warm-up
        for r in range(args.rounds):
            for name, make in libs.items():
                mask[name].append(mask_cost(make, args.tokens, r) * 1e6)
            for name, make in [("free", None), *libs.items()]:
                secs, steps = engine_run(engine, prompt, make, args.new, vocab)
                step_ms[name].append(secs / steps * 1e3)
    finally:
        engine.stop()
    free = statistics.median(step_ms["free"])
    rows = []
    print(f"batch {BATCH}, {args.rounds} rounds, medians (demo model, {vocab} vocab, torch "
          f"threads {torch.get_num_threads()})")
    print(f"{'library':<16} {'mask µs/token':>14} {'ms/step b=8':>12} {'overhead µs/token':>18}")
    print(f"{'free':<16} {'':>14} {free:>12.2f} {'':>18}")
    for name in libs:
        m, s = statistics.median(mask[name]), statistics.median(step_ms[name])
        over = (s - free) * 1e3 / BATCH
        rows.append({"library": name, "mask_us_per_token": m, "ms_per_step": s,
                     "overhead_us_per_token": over})
        print(f"{name:<16} {m:>14.1f} {s:>12.2f} {over:>18.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grammar.json").write_text(json.dumps(
        {"batch": BATCH, "rounds": args.rounds, "free_ms_per_step": free, "libraries": rows,
         "raw": {"mask_us": mask, "step_ms": step_ms}}, indent=2))


if __name__ == "__main__":
    main()
