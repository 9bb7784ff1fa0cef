"""`gateway demo-model`: deterministic bytes, loadable by transformers and peft, distinct tenants."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from backends.local.commands import demo

STEPS = 24  # enough for the adapters to move greedy output off the base model's
PROMPT = [{"role": "user", "content": "I would like a refund for my order."}]
ADAPTERS = ("acme-support", "globex-legal")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    demo.write_demo(out, steps=STEPS, log=lambda _: None)
    return out


def test_writes_the_expected_files(model_dir: Path) -> None:
    names = set(_digests(model_dir))
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    expected |= {
        f"adapters/{a}/{f}"
        for a in ADAPTERS
        for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert expected <= names
    assert not list(model_dir.parent.glob("model.tmp*")), "temporary folder left behind"


def test_same_bytes_on_every_run(model_dir: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    again = tmp_path / "again"
    demo.write_demo(again, steps=STEPS, log=lambda _: None)
    assert _digests(again) == _digests(model_dir)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_existing_model_is_kept_unless_forced(model_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    demo.write_demo(model_dir, steps=STEPS, log=lines.append)
    assert lines == [f"demo model already present in {model_dir}; pass force to rebuild"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        demo.write_demo(other, steps=1, log=lambda _: None)
    demo.write_demo(other, steps=1, force=True, log=lambda _: None)
    assert (other / "config.json").exists() and not (other / "notes.txt").exists()


def test_config_and_adapter_layout(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["eos_token_id"] == demo.TURN_END_ID
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == demo.TURN_END_ID

    hidden, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    outs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    for name in ADAPTERS:
        acfg = json.loads((model_dir / "adapters" / name / "adapter_config.json").read_text())
        assert (acfg["peft_type"], acfg["r"], acfg["lora_alpha"]) == ("LORA", 8, 16)
        tensors = load_file(model_dir / "adapters" / name / "adapter_model.safetensors")
        assert len(tensors) == cfg["num_hidden_layers"] * 4 * 2
        for i in range(cfg["num_hidden_layers"]):
            for proj, out in outs.items():
                key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                assert tensors[f"{key}.lora_A.weight"].shape == (8, hidden)
                assert tensors[f"{key}.lora_B.weight"].shape == (out, 8)
                assert tensors[f"{key}.lora_B.weight"].abs().sum() > 0  # trained, not init


def test_chat_template_renders_like_the_training_text(model_dir: Path) -> None:
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(tcfg["chat_template"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Where is my order?"},
    ]
    text = template.render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=tcfg["bos_token"],
        eos_token=tcfg["eos_token"],
    )
    pairs = [(m["role"], m["content"]) for m in messages]
    assert text == demo.render_chat(pairs, add_generation_prompt=True)[0]
    assert text.endswith("<|im_start|>assistant\n")

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id(tcfg["bos_token"]) == demo.BOS_ID
    assert ids.count(tok.token_to_id(tcfg["eos_token"])) == len(messages)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.get_vocab_size() <= json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_transformers_and_peft_load_it_and_tenants_answer_differently(model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model, info = transformers.LlamaForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    enc = tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = enc["input_ids"]
    expected = demo.render_chat([("user", PROMPT[0]["content"])], add_generation_prompt=True)[0]
    assert tok.decode(ids[0]) == expected

    pm = peft.PeftModel.from_pretrained(
        model, model_dir / "adapters" / ADAPTERS[0], adapter_name=ADAPTERS[0]
    )
    pm.load_adapter(model_dir / "adapters" / ADAPTERS[1], adapter_name=ADAPTERS[1])
    pm.eval()
    layer0 = pm.base_model.model.model.layers[0].self_attn.q_proj
    for name in ADAPTERS:
        saved = load_file(model_dir / "adapters" / name / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        assert torch.equal(layer0.lora_B[name].weight, saved[key])

    def greedy() -> list[int]:
        out = pm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=demo.PAD_ID,
        )
        return out[0, ids.shape[1] :].tolist()

    with pm.disable_adapter():
        base = greedy()
    outputs = {}
    for name in ADAPTERS:
        pm.set_adapter(name)
        outputs[name] = greedy()
    assert base != outputs[ADAPTERS[0]]
    assert base != outputs[ADAPTERS[1]]
    assert outputs[ADAPTERS[0]] != outputs[ADAPTERS[1]]
