"""`gateway prune SRC DST --drop-layers N --ffn-keep F`: a smaller checkpoint by structured
pruning, chosen by importance measured on a calibration set.

Calibration: `--calibration FILE` (text; blank-line separated passages, tokenized with SRC's
tokenizer and cut into windows), else generated: the model's own samples from BOS
(temperature 1, top-p 0.95; data-free, works for any checkpoint). Importance, from activation
norms over every calibration token:

    layer l:          s_l    = mean_t ||h_{l+1} - h_l|| / ||h_l||   (its update to the residual
                                                                    stream, relative)
    FFN channel j:    c_l[j] = mean_t |silu(g_j) u_j| * ||W_down[:, j]||  (the norm of what the
                                                                    channel adds to the stream)

The N layers with the smallest s_l are dropped (the rest keep their order) and every layer
keeps the round-down-to-8 of F x intermediate_size channels with the largest c_l[j].
DST is a Hugging Face checkpoint like any other (float, SRC's dtype; `gateway quantize` or
`quantize: int8` go on top), with `memgate_pruned` in config.json: its name (adapters made for
it name it as base_model_name_or_path; others are refused at load), what was dropped, and the
source's sizes for `gateway plan`. Tokenizer files are copied; adapters are not (they belong
to SRC; `--adapters` writes copies of the attention-only ones remapped to the kept layers).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.hf.safetensors import checkpoint_files
from backends.local.loader import load_checkpoint, map_safetensors
from backends.local.memory_plan import is_quantizable
from backends.local.model import Llama

CHANNEL_ALIGN = 8
FFN = ("gate_proj", "up_proj", "down_proj")


class PruneError(ValueError):
    """The source cannot be pruned as asked, or the destination cannot be written."""


@dataclass
class Importance:
    layers: list[float]  # s_l
    channels: list[torch.Tensor]  # c_l [intermediate_size] per layer
    tokens: int


def calibration_ids(
    model: Llama, src: Path, text: Path | None, sequences: int, length: int, seed: int
) -> torch.Tensor:
    """[sequences, length] token ids: windows of `text`, else the model's own samples."""
    cfg = model.config
    if text is not None:
        from backends.hf.tokenizer import ChatTokenizer

        tok = ChatTokenizer.from_dir(src, cfg.eos_token_ids)
        passages = [p for p in text.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        ids = [t for p in passages for t in tok.encode(p)]
        n = len(ids) // length
        if n < 1:
            raise PruneError(f"{text}: {len(ids)} tokens, fewer than one window of {length}")
        return torch.tensor(ids[: n * length]).view(n, length)[:sequences]
    gen = torch.Generator().manual_seed(seed)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 0
    out = torch.full((sequences, 1), bos, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(length - 1):
            probs = torch.softmax(model.forward_full(out)[:, -1], dim=-1)
            sorted_p, order = torch.sort(probs, descending=True)
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) > 0.95] = 0
            pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
            out = torch.cat([out, order.gather(-1, pick)], dim=1)
    return out


def measure(model: Llama, ids: torch.Tensor) -> Importance:
    """Layer and FFN-channel importance over `ids` (the forward of Llama.forward_full)."""
    layers = model.layers
    scores = [0.0] * len(layers)
    channels = [torch.zeros(layer.mlp.gate_proj.out_features) for layer in layers]
    with torch.inference_mode():
        x = model.model.embed_tokens(ids)
        cos, sin = model._rope(torch.arange(ids.shape[1]), x.dtype)
        for i, layer in enumerate(layers):
            h = x + layer.self_attn.forward_full(layer.input_layernorm(x), cos, sin)
            n = layer.post_attention_layernorm(h)
            act = layer.mlp.hidden(n)
            out = h + layer.mlp.down_proj(act)
            rel = (out - x).float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)
            scores[i] = rel.mean().item()
            down = layer.mlp.down_proj.weight.float().norm(dim=0)
            channels[i] = act.float().abs().mean(dim=(0, 1)) * down
            x = out
    return Importance(scores, channels, int(ids.numel()))


def choose(imp: Importance, drop_layers: int, ffn_keep: float) -> tuple[list[int], list[torch.Tensor]]:
    """Kept layer indices (in order) and, per kept layer, its kept FFN channels (ascending)."""
    n = len(imp.layers)
    if not 0 <= drop_layers < n:
        raise PruneError(f"--drop-layers must be between 0 and {n - 1} (the model has {n})")
    if not 0 < ffn_keep <= 1:
        raise PruneError("--ffn-keep must be in (0, 1]")
    dropped = sorted(range(n), key=lambda i: imp.layers[i])[:drop_layers]
    kept = [i for i in range(n) if i not in dropped]
    width = imp.channels[0].numel()
    keep = max(CHANNEL_ALIGN, math.floor(ffn_keep * width / CHANNEL_ALIGN) * CHANNEL_ALIGN)
    keep = min(keep, width)
    chans = [torch.sort(torch.topk(imp.channels[i], keep).indices).values for i in kept]
    return kept, chans


def pruned_state(
    state: dict[str, torch.Tensor], kept: list[int], chans: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    where = {old: new for new, old in enumerate(kept)}
    for name, t in state.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
            old = int(parts[2])
            if old not in where:
                continue
            new = where[old]
            parts[2] = str(new)
            keep = chans[new]
            if parts[-2] in ("gate_proj", "up_proj") and parts[-1] == "weight":
                t = t.index_select(0, keep)
            elif parts[-2] == "down_proj" and parts[-1] == "weight":
                t = t.index_select(1, keep)
            name = ".".join(parts)
        out[name] = t.contiguous()
    return out


def source_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameter counts `gateway plan` needs to show the source's weight bytes in any dtype."""
    sizes = {"matrix_params": 0, "matrix_rows": 0, "other_params": 0}
    for name, t in state.items():
        if is_quantizable(name, list(t.shape)):
            sizes["matrix_params"] += t.numel()
            sizes["matrix_rows"] += t.shape[0]
        else:
            sizes["other_params"] += t.numel()
    return sizes


def prune_checkpoint(
    src: str | Path,
    dst: str | Path,
    drop_layers: int,
    ffn_keep: float,
    calibration: Path | None = None,
    sequences: int = 16,
    length: int = 128,
    seed: int = 0,
    adapters: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Write the pruned checkpoint; returns the `memgate_pruned` record."""
    src, dst = Path(src), Path(dst)
    raw = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else None
    if raw is None:
        raise PruneError(f"{src}: no config.json")
    if raw.get("quantization_config"):
        raise PruneError(f"{src} is quantized: prune the float checkpoint, then quantize")
    if dst.exists() and any(dst.iterdir()):
        raise PruneError(f"{dst} exists and is not empty")
    loaded = load_checkpoint(src)
    model = loaded.model
    ids = calibration_ids(model, src, calibration, sequences, length, seed)
    log(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens "
        f"({'from ' + str(calibration) if calibration else 'sampled from the model'})")
    imp = measure(model, ids)
    kept, chans = choose(imp, drop_layers, ffn_keep)
    dropped = [i for i in range(len(imp.layers)) if i not in kept]
    log("layer importance: " + ", ".join(f"{i}:{s:.3f}" for i, s in enumerate(imp.layers))
        + f"; dropping {dropped or 'none'}")
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(src):
        state.update(map_safetensors(path).tensors)
    if raw.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    if not all(t.is_floating_point() for t in state.values()):
        raise PruneError(f"{src}: holds non-float tensors; prune a float checkpoint")
    name = str(raw.get("_name_or_path") or src.name)
    width = int(raw["intermediate_size"])
    record: dict[str, Any] = {
        "name": f"{name}-pruned-l{len(kept)}-ffn{chans[0].numel()}",
        "source": {"name": name, "num_hidden_layers": len(imp.layers), "intermediate_size": width,
                   **source_sizes(state)},
        "dropped_layers": dropped, "ffn_keep": ffn_keep,
        "calibration": str(calibration) if calibration else f"sampled, seed {seed}",
        "calibration_tokens": imp.tokens, "layer_importance": [round(s, 5) for s in imp.layers],
    }
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file(pruned_state(state, kept, chans), str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    for item in src.iterdir():
        skip = item.suffix == ".safetensors" or item.name in (
            "config.json", "model.safetensors.index.json", "adapters")
        if not skip:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)
    if adapters and (src / "adapters").is_dir():
        remap_adapters(src / "adapters", dst / "adapters", kept, record["name"], log)
    config = {**raw, "num_hidden_layers": len(kept), "intermediate_size": int(chans[0].numel()),
              "memgate_pruned": record}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return record


def remap_adapters(src: Path, dst: Path, kept: list[int], name: str, log: Any) -> None:
    """Copies of SRC's adapters for the pruned model: the kept layers' attention deltas,
    renumbered; adapters that touch the FFN (whose shapes changed) are left out."""
    from safetensors.torch import save_file

    where = {old: new for new, old in enumerate(kept)}
    for adir in sorted(p for p in src.iterdir() if (p / "adapter_config.json").exists()):
        tensors = map_safetensors(adir / "adapter_model.safetensors").tensors
        if any(f".{m}." in k for k in tensors for m in FFN):
            log(f"adapter {adir.name}: adapts the FFN, whose shapes changed: not carried over")
            continue
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            parts = key.split(".")
            i = parts.index("layers") + 1
            if int(parts[i]) in where:
                parts[i] = str(where[int(parts[i])])
                out[".".join(parts)] = t.clone()
        (dst / adir.name).mkdir(parents=True)
        save_file(out, str(dst / adir.name / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((adir / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = name
        (dst / adir.name / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        log(f"adapter {adir.name}: remapped to the kept layers")
