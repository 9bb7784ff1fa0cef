"""KV cache blocks in plain Python: a free list, reservations, and per-sequence block tables.

A sequence is admitted by reserving blocks for what it is expected to need: its prompt +
max_tokens (`kv_admission: worst_case`, so it never needs more) or its prompt + the estimate
(`estimate`). Blocks are taken from the free list lazily as tokens arrive, so `used` reflects
tokens actually stored (block exact). A sequence that outgrows its reservation grows it with
unreserved blocks (`ensure`); when there are none, the scheduler preempts someone first.
Invariant: len(free) >= sum over sequences of (reserved - allocated), and every sequence's
reservation covers what it holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backends.local.memory_plan import blocks_for


class KVCapacityError(Exception):
    """The KV cache cannot hold what was asked for."""


@dataclass
class BlockTable:
    reserved: int
    blocks: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, BlockTable] = {}
        self._reserved = 0

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    @property
    def reserved_blocks(self) -> int:
        return self._reserved

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def unreserved_blocks(self) -> int:
        return self.num_blocks - self._reserved

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.unreserved_blocks

    def reserve(self, seq_id: int, tokens: int) -> None:
        """Promise `seq_id` room for `tokens` tokens; raises if it does not fit now."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds a reservation")
        need = self.blocks_for(tokens)
        if need > self.unreserved_blocks:
            raise KVCapacityError(f"need {need} KV blocks, {self.unreserved_blocks} unreserved")
        self._tables[seq_id] = BlockTable(reserved=need)
        self._reserved += need

    def can_grow(self, seq_id: int, tokens: int) -> bool:
        """`ensure(seq_id, tokens)` would succeed: within the reservation, or the blocks it
        lacks are unreserved."""
        extra = self.blocks_for(tokens) - self._tables[seq_id].reserved
        return extra <= self.unreserved_blocks

    def ensure(self, seq_id: int, tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `tokens` tokens, growing its reservation with
        unreserved blocks where it outgrows it (KVCapacityError when there are too few)."""
        table = self._tables[seq_id]
        need = self.blocks_for(tokens)
        if need > table.reserved:
            extra = need - table.reserved
            if extra > self.unreserved_blocks:
                raise KVCapacityError(
                    f"sequence {seq_id} needs {extra} blocks more than reserved, "
                    f"{self.unreserved_blocks} unreserved"
                )
            table.reserved += extra
            self._reserved += extra
        while len(table.blocks) < need:
            table.blocks.append(self._free.popleft())
        return table.blocks

    def blocks(self, seq_id: int) -> list[int]:
        return self._tables[seq_id].blocks

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def reserved_for(self, seq_id: int) -> int:
        table = self._tables.get(seq_id)
        return 0 if table is None else table.reserved

    def release(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        self._free.extend(table.blocks)
        self._reserved -= table.reserved
