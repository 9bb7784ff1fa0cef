"""Model hyper-parameters read from (and written to) a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    dtype: str = "float32"
    pruned_name: str | None = None  # `gateway prune` output: adapters must name this model

    @property
    def context_window(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ArchConfig:
        by_type = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        archs = d.get("architectures") or [by_type.get(d.get("model_type", "llama"), "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}; only silu")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            cfg_vals = {
                "vocab_size": int(d["vocab_size"]),
                "intermediate_size": int(d["intermediate_size"]),
                "num_hidden_layers": int(d["num_hidden_layers"]),
            }
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} not a multiple of kv heads {kv_heads}")

        rope_params = d.get("rope_parameters") or {}
        rope_theta = float(d.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = d.get("rope_scaling") or rope_params or None
        if scaling is not None:
            rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"unsupported rope scaling type {rope_type!r}; "
                    f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}

        max_pos = int(d.get("max_position_embeddings") or 2048)
        window = d.get("sliding_window")
        if window and (d.get("use_sliding_window", True)) and int(window) < max_pos:
            max_pos = int(window)  # beyond the window we would differ from the reference

        is_qwen2 = arch == "Qwen2ForCausalLM"
        bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        eos_ids = (
            tuple(int(e) for e in eos)
            if isinstance(eos, list)
            else ((int(eos),) if eos is not None else ())
        )
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        pruned = d.get("memgate_pruned")
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if is_qwen2 else bias,
            attention_out_bias=False if is_qwen2 else bias,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
            dtype=str(dtype),
            pruned_name=str(pruned["name"]) if isinstance(pruned, dict) and "name" in pruned else None,
            **cfg_vals,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers loads (LlamaForCausalLM unless Qwen2-style bias)."""
        qwen2 = self.attention_bias and not self.attention_out_bias
        if self.attention_out_bias and not self.attention_bias:
            raise ValueError("o_proj bias without q/k/v bias has no Hugging Face equivalent")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        eos: int | list[int] | None = (
            None
            if not self.eos_token_ids
            else self.eos_token_ids[0]
            if len(self.eos_token_ids) == 1
            else list(self.eos_token_ids)
        )
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "dtype": self.dtype,
        }
        if not qwen2:
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.rope_scaling:
            out["rope_scaling"] = dict(rope)
        if self.pruned_name is not None:
            out["memgate_pruned"] = {"name": self.pruned_name}
        return out
