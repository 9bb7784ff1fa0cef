"""How close an int8 KV cache (`kv_dtype: int8`) keeps a model to its float cache.

For each prompt the float cache generates greedily; the int8 cache is then fed the same
tokens (teacher forcing), so every step compares the two caches on the same context:

    agreement = share of steps whose int8 argmax equals the float argmax
    cosine    = cosine similarity of the two steps' logits (mean and minimum over steps)

Used by bench/capacity.py (docs/performance.md figures) and by a test that holds a floor on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.local.model import KVPool, Llama, SeqSpan, StepInput


@dataclass(frozen=True)
class KVQuality:
    steps: int
    agreement: float
    cosine_mean: float
    cosine_min: float


def _generate(model: Llama, ids: list[int], new: int, kv_dtype: str,
              forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (or `forced` ones) and the logits [new, V] before each of them."""
    dev = model.device
    n = len(ids)
    kv = KVPool.allocate(model.config, n + new, model.compute_dtype, dev, kv_dtype)

    def step(tokens: list[int], start: int) -> torch.Tensor:
        span = torch.arange(start + len(tokens), device=dev)
        positions = torch.arange(start, start + len(tokens), device=dev)
        inp = StepInput(input_ids=torch.tensor(tokens, device=dev), positions=positions,
                        write_slots=positions, seqs=[SeqSpan(0, len(tokens), span)],
                        logits_rows=torch.tensor([len(tokens) - 1], device=dev))
        return model.forward_step(inp, kv)[0]

    out: list[int] = []
    logits = []
    with torch.inference_mode():
        lg = step(ids, 0)
        for t in range(new):
            logits.append(lg)
            out.append(forced[t] if forced is not None else int(lg.argmax()))
            if t + 1 < new:
                lg = step([out[-1]], n + t)
    return out, torch.stack(logits).float()


def compare(model: Llama, prompts: list[list[int]], new_tokens: int) -> KVQuality:
    agree = steps = 0
    cosines: list[torch.Tensor] = []
    for ids in prompts:
        tokens, ref = _generate(model, ids, new_tokens, "auto")
        _, q = _generate(model, ids, new_tokens, "int8", forced=tokens)
        agree += int((q.argmax(-1) == ref.argmax(-1)).sum())
        steps += len(tokens)
        cosines.append(F.cosine_similarity(q, ref, dim=-1))
    cos = torch.cat(cosines)
    return KVQuality(steps, agree / max(steps, 1), float(cos.mean()), float(cos.min()))
