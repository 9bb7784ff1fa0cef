"""Batched paged decode attention against the per-sequence formulation, and the argmax rule.

The batched kernel adds the same products as one SDPA call per sequence, in another order
(padded length, query heads grouped per KV head). These tests bound that difference and
check what the engine's exact-token tests rely on: a greedy token can only change where the
top-2 logit margin is within the difference, and on these models it never is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.hf.config import ArchConfig
from backends.local.attention import DecodeBatch, decode_attention, prefill_attention
from backends.local.model import KVPool, Llama, SeqSpan, StepInput

from .conftest import random_hf_model

BS = 4


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
    """The engine's former decode: one SDPA call per sequence over its own gathered keys."""
    out = []
    for b, s in enumerate(slots):
        ks, vs = k.index_select(0, s).transpose(0, 1), v.index_select(0, s).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[b][:, None], ks, vs, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_equals_per_sequence(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    kv_heads, heads, dim, blocks = 2, 8, 16, 64
    k = torch.randn(blocks * BS, kv_heads, dim, generator=g).to(dtype)  # [slots, KVH, D]
    v = torch.randn(blocks * BS, kv_heads, dim, generator=g).to(dtype)
    lengths = [1, 5, 17, 32, 9]
    order = torch.randperm(blocks, generator=g).tolist()  # scattered, interleaved blocks
    tables, at = [], 0
    for n in lengths:
        need = -(-n // BS)
        tables.append(order[at : at + need])
        at += need
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    batch = DecodeBatch.from_tables(list(range(len(lengths))), tables, lengths, BS, q.device)
    assert batch.length == max(-(-n // BS) for n in lengths) * BS and batch.leading
    slots = [(torch.tensor(t)[:, None] * BS + torch.arange(BS)).flatten()[:n]
             for t, n in zip(tables, lengths, strict=True)]
    got = decode_attention(q, k, v, batch).float()
    want = per_sequence(q, k, v, slots).float()
    assert (got - want).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)
    same = DecodeBatch.from_slots(list(range(len(lengths))), slots, q.device)
    assert torch.equal(decode_attention(q, k, v, same), decode_attention(q, k, v, batch))


def test_prefill_chunk_is_causal_from_its_offset() -> None:
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(40, 2, 16, generator=g), torch.randn(40, 2, 16, generator=g)
    slots = torch.randperm(40, generator=g)[:23]
    q = torch.randn(23, 8, 16, generator=g)
    full = prefill_attention(q, k, v, slots)  # the whole prompt at once
    chunk = prefill_attention(q[15:], k, v, slots)  # its last 8 positions, context 23
    assert (full[15:] - chunk).abs().max().item() < 1e-5


def test_batched_step_keeps_every_argmax() -> None:
    """Each sequence decoded alone vs all in one step (mixed with a prefill chunk): the logits
    agree to 1e-4 and the argmax agrees wherever the top-2 margin exceeds twice that bound
    (here: at every position, the precondition of the engine's exact-token tests)."""
    hf = random_hf_model(97)
    sd = hf.state_dict()
    model = Llama(ArchConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(sd, strict=True)
    model.eval()
    g = torch.Generator().manual_seed(2)
    lengths = [3, 11, 6, 20]
    ids = [torch.randint(0, 97, (n + 1,), generator=g) for n in lengths]
    tables = [[4 * i + j for j in range(8)] for i in range(len(lengths))]
    pool = KVPool.allocate(model.config, 64 * BS, torch.float32, "cpu")

    def slots(i: int, n: int) -> torch.Tensor:
        return (torch.tensor(tables[i])[:, None] * BS + torch.arange(BS)).flatten()[:n]

    def step(rows: list[int], prefill: bool = False) -> torch.Tensor:
        """Decode the last token of each sequence in `rows`; with `prefill`, first fill the
        KV of every prompt as one step (the chunk sits before the decodes in the flat batch)."""
        spans, toks, pos, writes = [], [], [], []
        for i in rows:
            n = lengths[i]
            start = len(toks)
            if prefill:
                spans.append(SeqSpan(start, n, slots(i, n)))
                toks += ids[i][:n].tolist()
                pos += list(range(n))
                writes += slots(i, n).tolist()
            spans.append(SeqSpan(len(toks), 1, slots(i, n + 1)))
            toks.append(int(ids[i][n]))
            pos.append(n)
            writes.append(int(slots(i, n + 1)[-1]))
        s = StepInput(torch.tensor(toks), torch.tensor(pos), torch.tensor(writes), spans,
                      torch.tensor([sp.start for sp in spans if sp.length == 1]))
        with torch.inference_mode():
            return model.forward_step(s, pool)

    everyone = list(range(len(lengths)))
    together = step(everyone, prefill=True)
    alone = torch.cat([step([i]) for i in everyone])
    diff = (together - alone).abs().max().item()
    assert diff < 1e-4  # the bound the parity tests hold against transformers
    top2 = alone.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    stable = margin > 2 * diff
    assert torch.equal(together.argmax(-1)[stable], alone.argmax(-1)[stable])
    assert bool(stable.all()), f"margins {margin.tolist()} vs difference {diff}"
