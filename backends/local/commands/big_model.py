"""`gateway demo-model DIR --size big`: a random 360M-parameter Qwen2-layout checkpoint.

Shape (the laptop-sized one): hidden 896, 24 layers, 14 query / 2 KV heads
(head_dim 64), FFN 4864, q/k/v biases, tied embeddings, the demo's vocabulary (`demo.VOCAB_SIZE`) and
tokenizer. Stored in bfloat16 (as real checkpoints ship): about 0.72 GB on disk. Random weights
(seeded, std 0.02): its text is noise, it is for measuring where users run. `adapters/` holds
eight random rank-8 LoRA adapters on q/k/v/o (`rand-0` .. `rand-7`). No training: the same
command writes the same bytes in about a minute.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from backends.local.commands import demo
from backends.local.commands.mid_model import random_model

BIG_SHAPE: dict[str, Any] = {
    **demo.MODEL_SHAPE,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
}
SEED = 11


def write_big(out_dir: Path, *, force: bool = False, log: demo.Log = print) -> None:
    """Write the big model, tokenizer and adapters into `out_dir` (skipped if complete)."""
    build = functools.partial(_build, log=log)
    demo.write_atomically(Path(out_dir), build, "big model", force=force, log=log)


def _build(out: Path, log: demo.Log) -> None:
    cfg = random_model(out, BIG_SHAPE, SEED, log, dtype=torch.bfloat16)
    hf = {
        **cfg.to_hf(),
        "pad_token_id": demo.PAD_ID,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }
    demo._write_json(out / "config.json", hf)  # last: its presence marks a complete model
