"""bfloat16 projections on CPU in oneDNN's packed weight layout.

`F.linear` on bfloat16 CPU tensors hands oneDNN the plain [out, in] weight, which it reorders
into its blocked layout on every call; that reorder made bfloat16 slower than float32 at
batch 1 and 32 on this project's development CPU (AVX512-BF16; docs/performance.md "Engine speed"). Packing
once at load keeps only the blocked copy:

    packed = reorder(weight)                      (load, once; the plain weight is dropped)
    y = x @ weight^T + bias = linear(x, packed)   (Proj.base, fewer than UPCAST_ROWS rows)
    y = (x.float() @ to_float32(packed)^T).to(bfloat16)   (UPCAST_ROWS rows or more)

Without AMX, oneDNN's AVX512-BF16 kernel beats MKL's float32 one only where the weight bytes
dominate (a few rows); with hundreds of rows (prefill chunks) a per-call upcast of the packed
weight to float32 is faster than the bfloat16 kernel (`python -m bench.gemm`).

A layer's projections of one input are packed as one weight, [q; k; v] and [gate; up]
(`projection.Fused`): at a few rows a oneDNN call costs nearly as much for k's 128 outputs as for
q's 512, so one call for all three is what makes a bfloat16 step beat a float32 one with
adapters mixed in (docs/performance.md "Engine speed"). The members keep their adapters.

Only for bfloat16 on CPU where torch has the oneDNN ops; everything else keeps `F.linear`.
The packed weight is the projections' only copy: their state_dict entries are gone (the
checkpoint on disk is the source of truth for tools), and their bytes are counted as weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import torch

from backends.local.model import MLP, Attention, Llama
from backends.local.projection import Fused, Proj

log = logging.getLogger(__name__)
BATCH_HINT = 8  # the batch size oneDNN picks the blocked layout for; any batch runs


def available(dtype: torch.dtype, device: torch.device) -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
        and mkldnn is not None
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def reorder(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout for `BATCH_HINT` rows."""
    return cast(torch.Tensor, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))


def pack(model: Llama, release: Callable[[torch.Tensor], None] | None = None) -> int:
    """Pack every plain bfloat16 projection of `model` (int8 ones keep their own path).

    `release(weight)` is called with each plain weight as soon as its packed copy serves it
    (the loader gives its mapped pages back: weights held once, and a peak of one layer's
    projections above the packed model while packing). Returns how many were packed; 0 where
    packing does not apply or fails its self-check.
    """
    if not available(model.compute_dtype, model.device):
        return 0
    projs = [m for m in model.modules() if type(m) is Proj and m.weight.dtype == torch.bfloat16]
    if not projs:
        return 0
    probe = Proj(projs[0].in_features, projs[0].out_features).to(torch.bfloat16)
    x = torch.randn(3, probe.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.02)
        want = probe.base(x)
        try:
            probe.pack(reorder(probe.weight))
            ok = torch.allclose(probe.base(x), want, rtol=1e-2, atol=1e-2)
        except RuntimeError as e:
            log.info("oneDNN weight packing unavailable (%s): bfloat16 uses F.linear", e)
            return 0
    if not ok:
        log.info("oneDNN packed linear differs from F.linear: bfloat16 uses F.linear")
        return 0
    plain = set(projs)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups: list[tuple[Attention | MLP, list[Proj]]] = [
            (attn, [attn.q_proj, attn.k_proj, attn.v_proj]), (mlp, [mlp.gate_proj, mlp.up_proj])
        ]
        for parent, members in groups:
            biases = [m.bias.detach() for m in members if m.bias is not None]
            if not all(m in plain for m in members) or 0 < len(biases) < len(members):
                continue  # an int8 member, or biases on some only: each on its own
            bias = torch.cat(biases) if biases else None
            sources: list[torch.Tensor] = [m.weight for m in members]
            parent.fused = Fused(members, reorder(torch.cat(sources)), bias)
            plain.difference_update(members)
            if release is not None:
                for w in sources:
                    release(w)
    for proj in plain:
        source = proj.weight
        proj.pack(reorder(source))
        if release is not None:
            release(source)
    return len(projs)
