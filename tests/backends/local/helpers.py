"""Small helpers shared by the local backend tests."""

from __future__ import annotations

import torch

from backends.local.model import KVPool, Llama, SeqSpan, StepInput
from backends.local.projection import LoraBatch


def prefill_logits(model: Llama, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
    """Run all prompts as one flat step (adapter slot per prompt) on the model's device;
    logits [S, T, V] per token, on the CPU."""
    dev = model.device
    total = sum(len(p) for p in prompts)
    kv = KVPool.allocate(model.config, total, model.compute_dtype, dev)
    ids: list[int] = []
    spans: list[SeqSpan] = []
    pos: list[torch.Tensor] = []
    lora: list[int] = []
    for p, s in zip(prompts, slots, strict=True):
        spans.append(SeqSpan(len(ids), len(p), torch.arange(len(ids), len(ids) + len(p), device=dev)))
        pos.append(torch.arange(len(p)))
        ids.extend(p)
        lora.extend([s] * len(p))
    step = StepInput(
        input_ids=torch.tensor(ids, device=dev),
        positions=torch.cat(pos).to(dev),
        write_slots=torch.arange(total, device=dev),
        seqs=spans,
        logits_rows=torch.arange(total, device=dev),
        lora=LoraBatch.from_index(torch.tensor(lora, device=dev)),
    )
    with torch.inference_mode():
        flat = model.forward_step(step, kv).cpu()
    return torch.stack([flat[s.start : s.start + s.length] for s in spans])


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges of /proc/self/maps entries that map `path`."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == path:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out
