"""int8 weight-only quantization with one float scale per output channel (row).

    q = round(w / s).clamp(-127, 127),  s = max|w[row]| / 127      (offline, `gateway quantize`)
    y = (x @ q.T) * s + bias                                        (QuantProj.base)

Every matrix (projections, embeddings, lm_head) is quantized; norms and biases stay float.
A quantized checkpoint stores `X.weight` as I8 and `X.weight_scale` as F32 and is marked in
config.json with `"quantization_config": {"quant_method": "memgate-int8"}`; it is memory-mapped
like any other checkpoint, so workers share the int8 pages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.local.memory_plan import SCALE_SUFFIX, is_quantizable
from backends.local.model import Embedding, Llama
from backends.local.projection import Proj


class QuantizeError(ValueError):
    """The source cannot be quantized or the destination cannot be written."""


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q int8 [out, in], scale float32 [out])."""
    w32 = w.detach().to(torch.float32)
    scale = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class QuantProj(Proj):
    """A projection whose weight is int8 with a per-row scale; adapters stay float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(Embedding):
    """Embedding rows in int8 with a per-row scale; `project` serves a tied lm_head."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__(num, dim)
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(num), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale
        return F.embedding(ids, self.weight).to(scale.dtype) * scale[ids].unsqueeze(-1)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight.to(h.dtype)) * self.weight_scale.to(h.dtype)


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
