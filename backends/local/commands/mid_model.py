"""`gateway demo-model DIR --size mid`: a random Llama of a realistic shape, for benchmarks.

Shape: hidden 512, 8 layers, 8 query / 2 KV heads (head_dim 64), FFN 1408, vocabulary 2048:
24.6M parameters, 98 MB in float32. The weights are random (seeded, std 0.02), so its text is
noise; it exists to measure speed on shapes where the projections, not Python, dominate a step.
The tokenizer and chat template are the demo's (trained from `backends/local/commands/data/`, 2,048 tokens),
and `adapters/` holds eight random rank-8 LoRA adapters on q/k/v/o (`rand-0` .. `rand-7`) for
mixed-adapter runs. The same command writes the same bytes.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch

from backends.hf.config import ArchConfig
from backends.local.commands import demo
from backends.local.model import Llama

MID_SHAPE: dict[str, Any] = {
    **demo.MODEL_SHAPE,
    "vocab_size": 2048,  # the demo tokenizer's size
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
ADAPTERS = 8
SEED = 7


def random_adapter(model: Llama, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-layout tensors of a random rank-r adapter on the demo's target projections."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        for target in demo.LORA_TARGETS:
            proj = getattr(layer.self_attn, target)
            bound = 1.0 / math.sqrt(proj.in_features)
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            a = (torch.rand(demo.LORA_RANK, proj.in_features, generator=gen) * 2 - 1) * bound
            b = torch.randn(proj.out_features, demo.LORA_RANK, generator=gen) * 0.02
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a, b
    return out


def write_mid(out_dir: Path, *, force: bool = False, log: demo.Log = print) -> None:
    """Write the mid-size model, tokenizer and adapters into `out_dir` (skipped if complete)."""
    build = functools.partial(_build, log=log)
    demo.write_atomically(Path(out_dir), build, "mid-size model", force=force, log=log)


def _build(out: Path, log: demo.Log) -> None:
    cfg = random_model(out, MID_SHAPE, SEED, log)
    hf = {**cfg.to_hf(), "pad_token_id": demo.PAD_ID, "initializer_range": 0.02}
    demo._write_json(out / "config.json", hf)  # last: its presence marks a complete model


def random_model(out: Path, shape: dict[str, Any], seed: int, log: demo.Log,
                 dtype: torch.dtype = torch.float32) -> ArchConfig:
    """Into `out`: the demo's tokenizer, a `shape` model with random weights (seeded, saved in
    `dtype`) and ADAPTERS random rank-8 adapters (float32, from the float weights' shapes).
    The caller writes config.json (the mark of a complete model)."""
    plans = (demo.BASE_PLAN, *demo.ADAPTER_PLANS.values())
    files = sorted({f for plan in plans for f, _ in plan.corpora})
    texts = [demo.render_chat(d)[0] for f in files for d in demo.load_dialogues(f)]
    log("training tokenizer")
    tok = demo._train_tokenizer(texts)
    if tok.get_vocab_size() > shape["vocab_size"]:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, over the vocabulary")
    tok.save(str(out / "tokenizer.json"))
    demo._write_json(out / "tokenizer_config.json", demo.tokenizer_config())
    cfg = ArchConfig.from_hf(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(cfg)
    log(f"random weights ({sum(p.numel() for p in model.parameters()):,} parameters)")
    for i in range(ADAPTERS):
        adir = out / "adapters" / f"rand-{i}"
        adir.mkdir(parents=True)
        demo._save_tensors(adir / "adapter_model.safetensors", random_adapter(model, seed + 1 + i))
        demo._write_json(adir / "adapter_config.json", demo.adapter_config())
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    del model
    demo._save_tensors(out / "model.safetensors", state)
    return cfg
