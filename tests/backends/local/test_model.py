"""Our Llama against transformers: full forward, cached paged forward, configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from backends.hf.config import ArchConfig
from backends.local.model import KVPool, Llama, SeqSpan, StepInput

from .conftest import random_hf_model


def ours_from(hf: torch.nn.Module) -> Llama:
    cfg = ArchConfig.from_hf(hf.config.to_dict())
    m = Llama(cfg)
    sd = hf.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    m.load_state_dict(sd, strict=True)
    return m.eval()


def test_state_dict_keys_are_hf_keys() -> None:
    hf = random_hf_model(97)
    ours = Llama(ArchConfig.from_hf(hf.config.to_dict()))
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "lm_head.weight" in ours.state_dict()
    tied = Llama(ArchConfig.from_hf({**hf.config.to_dict(), "tie_word_embeddings": True}))
    assert "lm_head.weight" not in tied.state_dict()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
        {"tie_word_embeddings": True},
        {"attention_bias": True},
    ],
    ids=["gqa", "llama3-rope", "tied", "bias"],
)
def test_forward_full_matches_transformers(overrides: dict[str, object]) -> None:
    hf = random_hf_model(97, **overrides)
    if overrides.get("attention_bias"):
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    ours = ours_from(hf)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.forward_full(ids)
    assert (ref - got).abs().max().item() < 1e-4


def test_qwen2_matches_transformers() -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ours = ours_from(hf)
    assert ours.config.attention_bias and not ours.config.attention_out_bias
    ids = torch.randint(0, 101, (1, 33))
    with torch.no_grad():
        assert (hf(ids).logits - ours.forward_full(ids)).abs().max().item() < 1e-4


def paged_slots(blocks: list[int], n: int, block_size: int) -> torch.Tensor:
    table = torch.tensor(blocks)
    return (table[:, None] * block_size + torch.arange(block_size)).flatten()[:n]


def test_cached_step_matches_transformers_prefill_then_decode() -> None:
    hf = random_hf_model(97)
    ours = ours_from(hf)
    bs = 4
    kv = KVPool.allocate(ours.config, 64 * bs, torch.float32, "cpu")
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
    # two sequences with scattered, interleaved blocks; seq0 prompt 13, seq1 prompt 21
    blocks = [[7, 2, 30, 11, 5, 19, 40, 41, 3, 9], [0, 33, 14, 15, 60, 61, 1, 8, 22, 23, 50]]
    lens = [13, 21]
    with torch.inference_mode():
        step = StepInput(
            input_ids=torch.cat([ids[0, :13], ids[1, :21]]),
            positions=torch.cat([torch.arange(13), torch.arange(21)]),
            write_slots=torch.cat([paged_slots(blocks[0], 13, bs), paged_slots(blocks[1], 21, bs)]),
            seqs=[
                SeqSpan(0, 13, paged_slots(blocks[0], 13, bs)),
                SeqSpan(13, 21, paged_slots(blocks[1], 21, bs)),
            ],
            logits_rows=torch.tensor([12, 33]),
        )
        out = ours.forward_step(step, kv)
        assert (out[0] - ref[0, 12]).abs().max().item() < 1e-4
        assert (out[1] - ref[1, 20]).abs().max().item() < 1e-4
        for _ in range(6):  # decode one token each, seq1 also feeds a 3-token chunk once
            n1 = 3 if lens[1] == 21 else 1
            s0, s1 = (
                paged_slots(blocks[0], lens[0] + 1, bs),
                paged_slots(blocks[1], lens[1] + n1, bs),
            )
            step = StepInput(
                input_ids=torch.cat(
                    [ids[0, lens[0] : lens[0] + 1], ids[1, lens[1] : lens[1] + n1]]
                ),
                positions=torch.cat(
                    [torch.arange(lens[0], lens[0] + 1), torch.arange(lens[1], lens[1] + n1)]
                ),
                write_slots=torch.cat([s0[lens[0] :], s1[lens[1] :]]),
                seqs=[SeqSpan(0, 1, s0), SeqSpan(1, n1, s1)],
                logits_rows=torch.tensor([0, n1]),
            )
            out = ours.forward_step(step, kv)
            lens = [lens[0] + 1, lens[1] + n1]
            assert (out[0] - ref[0, lens[0] - 1]).abs().max().item() < 1e-4
            assert (out[1] - ref[1, lens[1] - 1]).abs().max().item() < 1e-4


def test_to_hf_round_trip_loads_in_transformers() -> None:
    cfg = ArchConfig.from_hf(random_hf_model(97).config.to_dict())
    d = cfg.to_hf()
    assert ArchConfig.from_hf(d) == cfg
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = Llama(cfg)
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - ours.forward_full(ids)).abs().max().item() < 1e-4


def test_random_init_is_trainable() -> None:
    cfg = ArchConfig.from_hf(random_hf_model(50).config.to_dict())
    m = Llama(cfg)
    std = m.model.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.015 < std < 0.025
    ids = torch.randint(0, 50, (2, 8))
    loss = torch.nn.functional.cross_entropy(
        m.forward_full(ids)[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    assert m.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "unsupported rope scaling type 'yarn'",
        ),
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_config_rejects_unsupported(patch: dict[str, object], message: str) -> None:
    d = {**random_hf_model(50).config.to_dict(), **patch}
    with pytest.raises(ValueError, match=message):
        ArchConfig.from_hf(d)


def test_config_reads_eos_list_and_defaults() -> None:
    cfg = ArchConfig.from_hf(
        {
            "architectures": ["MistralForCausalLM"],
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "eos_token_id": [2, 7],
            "rope_theta": 1e6,
            "sliding_window": None,
        }
    )
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 4 and cfg.rope_theta == 1e6
