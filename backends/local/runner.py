"""The model runner: all torch work of a step (inputs, forward, logits), nothing of scheduling.

`run(seqs)` turns the scheduled sequences into one flat `StepInput` (decoding sequences first,
so the batched decode attention reads rows 0..B-1), runs the model on the KV pool, and
returns float32 logits for the sequences that sample a token this step. Index tensors are
built from Python lists in one call each and moved to the device once.
"""

from __future__ import annotations

import torch

from backends.local.attention import DecodeBatch
from backends.local.block_manager import BlockManager
from backends.local.model import KVPool, Llama, SeqSpan, StepInput
from backends.local.projection import LoraBatch
from backends.local.scheduler import Sequence


class ModelRunner:
    def __init__(self, model: Llama, blocks: BlockManager, device: torch.device,
                 kv_dtype: str = "auto") -> None:
        self.model = model
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.device = device
        self.dtype = model.compute_dtype
        self.kv_dtype = kv_dtype
        self.kv: KVPool | None = None

    def allocate(self) -> KVPool:
        self.kv = KVPool.allocate(
            self.model.config, self.blocks.num_blocks * self.block_size, self.dtype, self.device,
            self.kv_dtype,
        )
        return self.kv

    def _slots(self, table: list[int], start: int, stop: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def prepare(self, seqs: list[Sequence]) -> tuple[StepInput, list[Sequence]]:
        """The step's flat input, and the sequences whose logits it yields (in that order)."""
        decoding = [s for s in seqs if s.chunk == 1]
        chunks = [s for s in seqs if s.chunk != 1]
        ids: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        lora: list[int] = []
        spans: list[SeqSpan] = []
        tables: list[list[int]] = []
        rows: dict[int, int] = {}
        dev = self.device
        for seq in decoding + chunks:
            start, n = seq.num_cached, seq.chunk
            table = self.blocks.blocks(seq.seq_id)
            row = len(ids)
            ids.extend(seq.step_ids())
            positions.extend(range(start, start + n))
            writes.extend(self._slots(table, start, start + n))
            lora.extend([seq.adapter_slot] * n)
            rows[seq.seq_id] = row + n - 1
            if n == 1:
                tables.append(table)
            else:
                slots = torch.tensor(self._slots(table, 0, start + n), dtype=torch.long)
                spans.append(SeqSpan(row, n, slots.to(dev)))
        sampled = [s for s in seqs if s.samples]
        decode = None
        if decoding:
            decode = DecodeBatch.from_tables(
                list(range(len(decoding))),
                tables,
                [s.num_cached + 1 for s in decoding],
                self.block_size,
                dev,
            )
        step = StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long).to(dev),
            positions=torch.tensor(positions, dtype=torch.long).to(dev),
            write_slots=torch.tensor(writes, dtype=torch.long).to(dev),
            seqs=spans,
            logits_rows=torch.tensor([rows[s.seq_id] for s in sampled], dtype=torch.long).to(dev),
            lora=LoraBatch.from_slots(lora, dev),
            decode=decode,
        )
        return step, sampled

    def _block_slots(self, blocks: list[int]) -> torch.Tensor:
        bs = self.block_size
        ids = torch.tensor(blocks, dtype=torch.long)
        return (ids[:, None] * bs + torch.arange(bs)).reshape(-1).to(self.device)

    def copy_out(self, blocks: list[int]) -> list[torch.Tensor]:
        """A host copy of `blocks` of every pool tensor (pinned on CUDA: the copy back is async
        with respect to the host)."""
        if self.kv is None:
            raise RuntimeError("the KV pool is not allocated")
        slots = self._block_slots(blocks)
        out = []
        for t in self.kv.tensors():
            part = t.index_select(0, slots)
            if self.device.type == "cuda":
                host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                host.copy_(part)
                part = host
            out.append(part)
        return out

    def copy_in(self, blocks: list[int], data: list[torch.Tensor]) -> None:
        """Write a `copy_out` back into `blocks` (the same bytes, perhaps other blocks)."""
        if self.kv is None:
            raise RuntimeError("the KV pool is not allocated")
        slots = self._block_slots(blocks)
        for t, host in zip(self.kv.tensors(), data, strict=True):
            t.index_copy_(0, slots, host.to(self.device, non_blocking=True))

    def run(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; logits [S, V] float32 (on the device) for the returned sequences."""
        if self.kv is None:
            raise RuntimeError("the KV pool is not allocated")
        step, sampled = self.prepare(seqs)
        return self.model.forward_step(step, self.kv), sampled
