"""KV cache blocks in plain Python: a free list, reservations, per-sequence block tables, and
a content-addressed cache of full blocks shared by reference count.

A sequence is admitted by reserving blocks for what it is expected to need: its prompt +
max_tokens (`kv_admission: worst_case`, so it never needs more) or its prompt + the estimate
(`estimate`). Blocks are taken lazily as tokens arrive, so `used` reflects tokens actually
stored (block exact). A sequence that outgrows its reservation grows it with unreserved
blocks (`ensure`); when there are none, the scheduler preempts someone first.

Prefix sharing: a full block can be published under a key (the hash of its adapter, tenant
salt and every token up to its end: scheduler.block_keys); a sequence admitted later whose
leading blocks have those keys attaches them (`reserve(prefix=...)`) instead of computing
them. A block is held while any sequence refers to it; an unreferenced published block stays
cached (LRU) until a new block is needed and the free list is empty.

Accounting: `available` = free + cached-unreferenced blocks; each table promises itself
`reserved - taken` more blocks, where `taken` counts blocks it took out of `available` (new
ones, and cached ones it revived); attaching a block another sequence holds costs nothing.
Invariant: available >= sum of promises, so a sequence within its reservation always finds a
block; `unreserved` = available - promises is what admission and growth may still promise.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from gateway.core.kv import blocks_for


class KVCapacityError(Exception):
    """The KV cache cannot hold what was asked for."""


@dataclass
class BlockTable:
    reserved: int
    taken: int = 0  # blocks this table took out of the available ones
    blocks: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, published: LRU first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._tables: dict[int, BlockTable] = {}
        self._promised = 0

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    @property
    def available_blocks(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds (a shared one once)."""
        return self.num_blocks - self.available_blocks

    @property
    def cached_blocks(self) -> int:
        """Unreferenced blocks kept for their content (reusable at once when memory is needed)."""
        return len(self._cached)

    @property
    def unreserved_blocks(self) -> int:
        return self.available_blocks - self._promised

    @property
    def reserved_blocks(self) -> int:
        """Held or promised blocks: what admission may not promise again."""
        return self.num_blocks - self.unreserved_blocks

    def refs(self, block: int) -> int:
        return self._refs[block]

    def match(self, keys: list[bytes]) -> list[int]:
        """The published blocks of the longest prefix of `keys`."""
        out = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def can_reserve(self, tokens: int, prefix: list[int] | None = None) -> bool:
        return self._need(tokens, prefix or []) <= self.unreserved_blocks

    def _need(self, tokens: int, prefix: list[int]) -> int:
        """Blocks to promise for `tokens` tokens whose leading blocks are `prefix`: every one
        but those another sequence already holds."""
        return self.blocks_for(tokens) - sum(1 for b in prefix if self._refs[b] > 0)

    def reserve(self, seq_id: int, tokens: int, prefix: list[int] | None = None) -> None:
        """Promise `seq_id` room for `tokens` tokens, its table starting with the cached
        blocks `prefix` (from `match`); raises if it does not fit now."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds a reservation")
        prefix = prefix or []
        need = self._need(tokens, prefix)
        if need > self.unreserved_blocks:
            raise KVCapacityError(f"need {need} KV blocks, {self.unreserved_blocks} unreserved")
        table = self._tables[seq_id] = BlockTable(reserved=need)
        self._promised += need
        for block in prefix:
            if self._refs[block] == 0:  # revived from the cache: taken out of `available`
                del self._cached[block]
                table.taken += 1
                self._promised -= 1
            self._refs[block] += 1
            table.blocks.append(block)

    def overflow(self, seq_id: int, tokens: int) -> int:
        """Blocks `ensure(seq_id, tokens)` would add to the reservation (0: it fits in it)."""
        table = self._tables[seq_id]
        new = self.blocks_for(tokens) - len(table.blocks)
        return max(0, table.taken + new - table.reserved)

    def can_grow(self, seq_id: int, tokens: int) -> bool:
        """`ensure(seq_id, tokens)` would succeed: within the reservation, or the blocks it
        lacks are unreserved."""
        return self.overflow(seq_id, tokens) <= self.unreserved_blocks

    def ensure(self, seq_id: int, tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `tokens` tokens, growing its reservation with
        unreserved blocks where it outgrows it (KVCapacityError when there are too few)."""
        table = self._tables[seq_id]
        new = self.blocks_for(tokens) - len(table.blocks)
        if new <= 0:
            return table.blocks
        over = table.taken + new - table.reserved
        if over > 0:
            if over > self.unreserved_blocks:
                raise KVCapacityError(
                    f"sequence {seq_id} needs {over} blocks more than reserved, "
                    f"{self.unreserved_blocks} unreserved"
                )
            table.reserved += over
            self._promised += over
        for _ in range(new):
            block = self._take()
            self._refs[block] = 1
            table.blocks.append(block)
        table.taken += new
        self._promised -= new
        return table.blocks

    def _take(self) -> int:
        """A block for new content: a free one, else the least recently used cached one."""
        if self._free:
            return self._free.popleft()
        block, _ = self._cached.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def publish(self, seq_id: int, index: int, key: bytes) -> None:
        """Block `index` of `seq_id` is full and holds what `key` names: later sequences may
        share it. A key published already keeps its first block."""
        block = self._tables[seq_id].blocks[index]
        if key in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

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
        self._promised -= table.reserved - table.taken
        for block in table.blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None  # most recently used last
                else:
                    self._free.append(block)
