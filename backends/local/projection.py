"""Linear projections with per-token LoRA: one step mixes adapters by slot (0 = base).

`Proj` is a projection with HF keys (`weight`, `bias`) plus adapters by slot; `Fused` serves a
layer's projections of one input ([q; k; v] or [gate; up]) with one packed GEMM (packing.py).
Each keeps the concatenated adapters of the slot sets its last steps mixed (`Stacks`), so
all adapters of a step cost two matmuls per input (`Stacks.add`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def lora_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype adapters are kept and applied in: float32 for a half-precision model.

    peft does the same by default (`autocast_adapter_dtype`: bfloat16/float16 adapter weights
    upcast to float32, the input cast up, the sum cast back), so outputs stay close to it; and
    on CPU a bfloat16 GEMM of LoRA's shapes (a few rows by rank) costs 2-3x a float32 one
    (`bench/step_ab.py --adapters 8`, docs/performance.md "Engine speed").
    """
    return torch.float32 if compute in (torch.bfloat16, torch.float16) else compute


@dataclass
class LoraWeights:
    """One adapter on one projection: y += scale * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraBatch:
    """Per-token adapter slots of one step (slot 0 = base), with the per-column weights that
    each set of adapters needs computed once per step and shared by every projection."""

    index: torch.Tensor  # [N] adapter slot of each flat token
    slots: list[int]  # the adapter slots present, ascending, without 0
    _weights: dict[tuple[tuple[int, int, float], ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_index(cls, index: torch.Tensor) -> LoraBatch | None:
        slots = [int(s) for s in torch.unique(index).tolist() if s != 0]
        return cls(index, slots) if slots else None

    @classmethod
    def from_slots(cls, slots: list[int], device: torch.device) -> LoraBatch | None:
        """Per-token slots as a list; None when every token is on the base model."""
        present = sorted(set(slots) - {0})
        return cls(torch.tensor(slots, dtype=torch.long).to(device), present) if present else None

    def column_weights(self, layout: tuple[tuple[int, int, float], ...], dtype: torch.dtype) -> torch.Tensor:
        """[N, sum r]: scale_i where the column belongs to the token's own adapter i, else 0.

        `layout` lists (slot, rank, scale) in column order of the concatenated adapters.
        """
        w = self._weights.get(layout)
        if w is None:
            col_slot = torch.tensor([s for s, r, _ in layout for _ in range(r)], device=self.index.device)
            col_scale = torch.tensor([c for _, r, c in layout for _ in range(r)], dtype=dtype,
                                     device=self.index.device)
            w = (self.index[:, None] == col_slot[None, :]).to(dtype) * col_scale
            self._weights[layout] = w
        return w


# [A of every member's adapters], each member's [B] (None: none of the set), its rank
# columns, and the (slot, rank, scale) column layout
Stack = tuple[torch.Tensor, list[torch.Tensor | None], list[int], tuple[tuple[int, int, float], ...]]
UPCAST_ROWS = 256  # packed bfloat16 projections of this many rows or more run in float32
STACK_SETS = 4  # adapter sets whose concatenated stacks a projection keeps (oldest dropped)


class Stacks:
    """The concatenated adapters of projections that share an input (one `Proj`, or a `Fused`
    group), for the last `STACK_SETS` slot sets a step mixed. A member's adapter change drops
    them all (`Proj._changed`); one built meanwhile goes into the dropped dict, never reused."""

    def __init__(self, projs: list[Proj]) -> None:
        self.projs = projs
        self.sets: dict[tuple[int, ...], Stack | None] = {}

    def get(self, slots: list[int]) -> Stack | None:
        sets, key = self.sets, tuple(slots)
        if key in sets:
            return sets[key]
        parts = []
        for p in self.projs:
            with p._lock:
                parts.append([(s, p.adapters[s]) for s in slots if s in p.adapters])
        stack = None
        if any(parts):
            layout = tuple((s, int(w.a.shape[0]), float(w.scale)) for part in parts for s, w in part)
            a = torch.cat([w.a for part in parts for _, w in part])
            bs = [torch.cat([w.b for _, w in part], dim=1) if part else None for part in parts]
            ranks = [sum(int(w.a.shape[0]) for _, w in part) for part in parts]
            stack = (a, bs, ranks, layout)
        if len(sets) >= STACK_SETS:
            del sets[next(iter(sets))]  # the oldest set
        sets[key] = stack
        return stack

    def clear(self) -> None:
        self.sets = {}

    @property
    def nbytes(self) -> int:
        tensors = [t for st in list(self.sets.values()) if st is not None for t in (st[0], *st[1])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def add(self, outs: list[torch.Tensor], x: torch.Tensor, lora: LoraBatch) -> None:
        """outs[m] += scale_i * (x A_i^T) B_i^T in place for member m, i = the token's slot.

        All adapters of the step at once: x @ [A_1; ...; A_n]^T gives every token its rank
        columns for every adapter of every member, the step's column weights keep only its own
        (times its scale), and one more matmul per member with [B_1 ... B_n] adds the delta. The
        stacks are in `lora_dtype` (float32 for a bfloat16 model: x is cast up, the sum cast back).
        """
        stack = self.get(lora.slots)
        if stack is None:  # no member has an adapter of the step's slots
            return
        a, bs, ranks, layout = stack
        xa = F.linear(x.to(a.dtype), a) * lora.column_weights(layout, a.dtype)
        for out, b, part in zip(outs, bs, torch.split(xa, ranks, -1), strict=True):
            if b is not None:
                out.add_(F.linear(part, b))


class Proj(nn.Module):
    """A linear projection (HF keys `weight`, `bias`) plus adapters by slot, kept out of state.

    Adapters change from the event loop's thread while the engine thread runs forwards: they
    are set and dropped, and read for `Stacks`, under `_lock`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.adapters: dict[int, LoraWeights] = {}
        self.packed: torch.Tensor | None = None  # oneDNN-blocked weight (packing.py)
        self.group: Fused | None = None  # the fused projection its weight is part of (packing.py)
        self.stacks = Stacks([self])
        self._lock = threading.Lock()

    def pack(self, packed: torch.Tensor) -> None:
        """Serve `base` from `packed` (packing.py); the plain weight is dropped."""
        self.packed = packed
        self._drop_weight()

    def fuse(self, group: Fused) -> None:
        """`group` serves its `base` with its siblings' in one GEMM; the plain weight is dropped."""
        self.group = group
        self._drop_weight()

    def _drop_weight(self) -> None:
        self.weight = nn.Parameter(self.weight.new_empty((0, self.in_features)), requires_grad=False)

    def set_adapter(self, slot: int, weights: LoraWeights) -> None:
        with self._lock:
            self.adapters[slot] = weights
            self._changed()

    def drop_adapter(self, slot: int) -> None:
        with self._lock:
            if self.adapters.pop(slot, None) is not None:
                self._changed()

    def _changed(self) -> None:
        """Drop the stacks built from the old adapters (its group's too: no stale copies)."""
        self.stacks.clear()
        if self.group is not None:
            self.group.stacks.clear()

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ weight.T + bias (quantized projections override this one method)."""
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        if self.group is not None:
            raise RuntimeError("this projection is served by its layer's fused projection")
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        """y = base(x) + its adapters' deltas (`Stacks.add`)."""
        y = self.base(x)
        if lora is not None and self.adapters:
            self.stacks.add([y], x, lora)
        return y


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with W in oneDNN's blocked layout (packing.py)."""
    if x.numel() >= UPCAST_ROWS * x.shape[-1]:  # a prefill chunk: see packing.py
        b32 = None if bias is None else bias.float()
        return F.linear(x.float(), packed.to_dense(torch.float32), b32).to(x.dtype)
    return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], ""))


class Fused:
    """Projections of one input served by one packed GEMM: a layer's [q; k; v] or [gate; up].

    One oneDNN call instead of three (or two) is the gain: at a few rows a bfloat16 call costs
    about as much for a 128-wide output as for a 768-wide one (packing.py). The fused weight is
    the members' only copy. Their adapters share the input too: one x @ [A of every member]^T
    (one cast, one matmul, one column weighting), then each member's own B on its slice.
    """

    def __init__(self, projs: list[Proj], packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.projs, self.packed, self.bias = projs, packed, bias
        self.sizes = [p.out_features for p in projs]
        self.stacks = Stacks(projs)
        for p in projs:
            p.fuse(self)

    def __call__(self, x: torch.Tensor, lora: LoraBatch | None) -> list[torch.Tensor]:
        outs = list(torch.split(packed_linear(x, self.packed, self.bias), self.sizes, -1))
        if lora is not None:
            self.stacks.add(outs, x, lora)
        return outs
