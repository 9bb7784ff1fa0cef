"""A random tiny Llama checkpoint (weights, tokenizer, chat template) and a PEFT adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Memory is the budget: every byte a request causes is accounted for.",
    "Hello world! How are you today? I am fine, thank you.",
    "A gateway serves many tenants from one shared base model with adapters.",
    "Les élèves mangent des crêpes à la crème. 東京は大きい都市です。",
    "def add(a, b):\n    return a + b\n",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyCheckpoint:
    model_dir: Path
    adapters_dir: Path
    adapter_name: str
    hf_config: dict[str, object]


def build_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return tok


def random_hf_model(vocab_size: int, seed: int = 0, **overrides: object) -> object:
    torch.manual_seed(seed)
    params: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "initializer_range": 0.2,
    }
    cfg = transformers.LlamaConfig(**{**params, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


def add_lora(
    model: object, adapter_dir: Path, r: int = 4, seed: int = 1,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj"), **kw: object,
) -> object:
    torch.manual_seed(seed)
    lcfg = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        init_lora_weights=False,  # random, non-zero lora_B
        lora_dropout=0.0,
        **kw,
    )
    pm = peft.get_peft_model(model, lcfg)
    pm.eval()
    pm.save_pretrained(str(adapter_dir))
    return pm


def write_checkpoint(root: Path) -> TinyCheckpoint:
    model_dir = root / "model"
    tok = build_tokenizer()
    model = random_hf_model(tok.get_vocab_size())
    model.save_pretrained(str(model_dir))
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": {"content": "</s>", "special": True},
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    hf_config = json.loads((model_dir / "config.json").read_text())
    adapters_dir = root / "adapters"
    add_lora(model, adapters_dir / "acme")
    return TinyCheckpoint(model_dir, adapters_dir, "acme", hf_config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"))
