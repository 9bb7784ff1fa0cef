"""int8 weight-only quantization with one float scale per output channel (row).

    q = round(w / s).clamp(-127, 127),  s = max|w[row]| / 127      (offline, `gateway quantize`)
    y = (x @ q.T) * s + bias                                        (QuantProj.base)

Every matrix (projections, embeddings, lm_head) is quantized; norms and biases stay float.
A quantized checkpoint stores `X.weight` as I8 and `X.weight_scale` as F32 and is marked in
config.json with `"quantization_config": {"quant_method": "memgate-int8"}`; it is memory-mapped
like any other checkpoint, so workers share the int8 pages.

The GEMM runs through a real int8 weight-only kernel where one passes its self-check at load
(`Int8Kernel`) when the model computes in bfloat16 (or float16): on CPU torch's
`_weight_int8pack_mm` (the int8 weight and a per-row scale, bfloat16 activations, float32
accumulation), chosen over oneDNN's dynamic int8 linear (activations quantized too, and torch.ao's
API is deprecated) and over dequantize + float GEMM (docs/engine.md "Weight formats"). On CUDA the same
op where torch has it, else `torch._int_mm` on per-row int8 activations (rows padded to 32),
else dequantize + GEMM. Shapes the kernel mishandles (an input width not a multiple of 16 gives
NaNs or a crash in the CPU kernel) keep the dequantize path, as does a float32 model (the
kernel's activations and outputs are 16-bit: `dtype: bfloat16` is the int8 serving dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from backends.local.memory_plan import SCALE_SUFFIX, is_quantizable
from backends.local.model import Embedding, Llama
from backends.local.projection import Proj


class QuantizeError(ValueError):
    """The source cannot be quantized or the destination cannot be written."""


ROWS = 256  # rows quantized at a time: float32 temporaries stay small (quantizing at load
# a whole matrix at once left the heap fragmented by as much as the float32 model)


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q int8 [out, in], scale float32 [out]), `ROWS` rows at a time."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], ROWS):
        w32 = w[r : r + ROWS].detach().to(torch.float32)
        s = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q[r : r + ROWS] = torch.round(w32 / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[r : r + ROWS] = s
    return q, scale


class Int8Kernel:
    """How an int8 [out, in] weight times activations is computed on one device.

    `mode`: "int8pack" (`_weight_int8pack_mm`), "int_mm" (`torch._int_mm`, CUDA) or "dequant".
    Chosen per (out, in) shape by `_choose`, which runs the candidate once on random data
    against the float reference (a kernel that crashes only on odd shapes is never tried on
    them: the input width must be a multiple of 16).
    """

    _checked: ClassVar[dict[tuple[str, int, int], str]] = {}  # (device type, out, in) -> mode

    @classmethod
    def mode(cls, out_f: int, in_f: int, device: torch.device, compute: torch.dtype) -> str:
        if compute not in (torch.bfloat16, torch.float16):
            return "dequant"  # float32 compute keeps float32 activations (the kernel's are 16-bit)
        key = (device.type, out_f, in_f)
        mode = cls._checked.get(key)
        if mode is None:
            mode = cls._choose(out_f, in_f, device)
            cls._checked[key] = mode
        return mode

    @classmethod
    def _choose(cls, out_f: int, in_f: int, device: torch.device) -> str:
        if in_f % 16 or out_f < 1 or device.type not in ("cpu", "cuda"):
            return "dequant"
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8).to(device)
        scale = (torch.rand(out_f, generator=gen) * 0.01 + 1e-4).to(device)
        x = torch.randn(3, in_f, generator=gen).to(device)
        want = (x.double() @ q.double().T) * scale.double()
        for mode in ("int8pack", "int_mm") if device.type == "cuda" else ("int8pack",):
            try:
                got = int8_matmul(x, q, scale, scale.to(torch.bfloat16), mode).double()
            except (RuntimeError, NotImplementedError, AttributeError):
                continue
            err = (got - want).abs().max() / want.abs().max().clamp(min=1e-9)
            if bool(torch.isfinite(got).all()) and float(err) < 0.03:
                return mode
        return "dequant"


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                kernel_scale: torch.Tensor, mode: str) -> torch.Tensor:
    """x [..., in] @ (q * scale[:, None]).T in x's dtype; `kernel_scale` is scale in bfloat16."""
    if mode == "dequant":
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, k)
    if mode == "int8pack":
        y = cast(torch.Tensor,
                 torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), q, kernel_scale))
    else:  # int_mm: per-row int8 activations; cuBLAS wants more than 16 rows
        xs = (flat.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(flat.float() / xs).clamp(-127, 127).to(torch.int8)
        rows = flat.shape[0]
        pad = max(32, -(-rows // 8) * 8) - rows
        if pad:
            xq = F.pad(xq, (0, 0, 0, pad))
        acc = torch._int_mm(xq, q.T)[:rows]
        y = acc.float() * xs * scale.float()
    return y.to(x.dtype).view(*lead, q.shape[0])


class QuantProj(Proj):
    """A projection whose weight is int8 with a per-row scale; adapters stay float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.kernel: str = "dequant"  # Int8Kernel's mode, set by `prepare`
        self.kernel_scale: torch.Tensor | None = None  # the scale in bfloat16, for the kernel

    def prepare(self, compute: torch.dtype) -> torch.Tensor | None:
        """Pick the kernel for this shape on this device (after the weights are assigned).
        Returns the weight it replaced by an aligned copy (`_align`), if it did."""
        self.kernel = Int8Kernel.mode(self.out_features, self.in_features, self.weight.device,
                                      compute)
        self.kernel_scale = self.weight_scale.detach().to(torch.bfloat16)
        return _align(self) if self.kernel != "dequant" else None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        ks = self.kernel_scale if self.kernel_scale is not None else self.weight_scale
        y = int8_matmul(x, self.weight, self.weight_scale, ks, self.kernel)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(Embedding):
    """Embedding rows in int8 with a per-row scale; `project` serves a tied lm_head."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__(num, dim)
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(num), requires_grad=False)
        self.kernel: str = "dequant"
        self.kernel_scale: torch.Tensor | None = None

    def prepare(self, compute: torch.dtype) -> torch.Tensor | None:
        self.kernel = Int8Kernel.mode(self.num_embeddings, self.embedding_dim, self.weight.device,
                                      compute)
        self.kernel_scale = self.weight_scale.detach().to(torch.bfloat16)
        return _align(self) if self.kernel != "dequant" else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale
        return F.embedding(ids, self.weight).to(scale.dtype) * scale[ids].unsqueeze(-1)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        ks = self.kernel_scale if self.kernel_scale is not None else self.weight_scale
        return int8_matmul(h, self.weight, self.weight_scale, ks, self.kernel)


ALIGN = 64  # bytes: the CPU kernel crashes on an int8 weight at an address not so aligned


def _align(m: QuantProj | QuantEmbedding) -> torch.Tensor | None:
    """Give `m` a 64-byte-aligned copy of its weight where the mapped one is not (a checkpoint
    `gateway quantize` did not write: it aligns every int8 matrix). Returns the old weight."""
    old = m.weight
    if old.data_ptr() % ALIGN == 0:
        return None
    m.weight = nn.Parameter(old.detach().clone(), requires_grad=False)
    return old


def prepare_kernels(
    model: Llama, release: Callable[[torch.Tensor], None] | None = None
) -> dict[str, int]:
    """Choose each int8 module's kernel; returns how many use each mode. A weight replaced by
    an aligned copy is handed to `release` (its mapped pages go: held once)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantProj | QuantEmbedding):
            old = m.prepare(model.compute_dtype)
            if old is not None and release is not None:
                release(old)
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def swap_quantized(model: Llama, weight_names: set[str]) -> None:
    """Replace the modules owning `weight_names` (`X.weight`) by their int8 versions (on meta)."""
    for name in sorted(weight_names):
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        with torch.device("meta"):
            if isinstance(old, Proj):
                new: nn.Module = QuantProj(old.in_features, old.out_features, old.bias is not None)
            elif isinstance(old, nn.Embedding):
                new = QuantEmbedding(old.num_embeddings, old.embedding_dim)
            else:
                raise QuantizeError(f"{name}: no int8 version of {type(old).__name__}")
        setattr(parent, attr, new)


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float state dict -> the int8 one (`X.weight` int8 + `X.weight_scale`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.is_floating_point() and is_quantizable(name, list(t.shape)):
            out[name], out[name + SCALE_SUFFIX] = quantize_tensor(t)
        else:
            out[name] = t
    return out
