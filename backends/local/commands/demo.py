"""`gateway demo-model DIR`: build a tiny, deterministic Llama checkpoint and two tenant adapters.

Nothing is downloaded. From the chat corpus shipped in ``backends/local/commands/data/`` this trains, in about a
minute on two CPU cores:

- a byte-level BPE tokenizer (``tokenizer.json``) with ChatML-style turn markers,
- a small grouped-query-attention Llama (``config.json``, ``model.safetensors``) in Hugging
  Face layout, trained with the local engine's own model module,
- two LoRA adapters in PEFT layout under ``adapters/``: ``acme-support`` (cheerful support
  answers) and ``globex-legal`` (formal legal answers), trained with the base frozen.

The output is byte-identical from run to run on one machine: fixed seeds, deterministic
algorithms, a fixed thread count, no timestamps, sorted JSON keys. It is written to a sibling
temporary folder and renamed into place, so a half-written model never looks complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"

BOS, PAD, TURN_START, TURN_END = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = (BOS, PAD, TURN_START, TURN_END)  # ids 0, 1, 2, 3
BOS_ID, PAD_ID, TURN_START_ID, TURN_END_ID = range(4)

# One source of truth for the prompt format: training text is rendered by `render_chat`,
# which tests check against this template rendered through jinja2. With `tools` the template
# adds a tools section to the system turn (Hermes-style: the model answers a call as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, which the local engine's grammar
# enforces and parses back); assistant turns with tool_calls render them the same way. A
# conversation without tools renders exactly as the training text.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set rest = messages %}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% set rest = messages[1:] %}{% endif %}"
    "{{ '# Tools\\nYou may call functions. They are listed in <tools></tools>:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools>\\nTo call one, answer with <tool_call>{\"name\": <name>, \"arguments\": "
    "<arguments>}</tool_call>.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in rest %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>{\"name\":' + (call['function']['name'] | tojson) + ',\"arguments\":' "
    "+ call['function']['arguments'] + '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_NAME = "memgate-demo"
VOCAB_SIZE = 2048
MODEL_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": TURN_END_ID,
    "dtype": "float32",
}

LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainPlan:
    """One training run: corpus files, steps, learning rate, and which tokens carry loss.

    Each corpus may name a system prompt given to its dialogues that have none: the base model
    sees the styled corpora only behind a style's system prompt, so without one it answers
    plainly, and an adapter has only to make the style the default.
    """

    corpora: tuple[tuple[str, str | None], ...]
    steps: int
    lr: float
    assistant_only: bool
    seed: int


SEQ_LEN, BATCH = 384, 3  # long enough for a tools section and the call after it
THREADS = 1  # fixed: with more, skinny GEMMs (LoRA's) reduce in a varying order
BASE_PLAN = TrainPlan(
    (
        ("demo_base.txt", None),
        ("demo_acme.txt", "You are a cheerful support assistant for Kestrel Goods."),
        ("demo_globex.txt", "You are a formal assistant. Cite the relevant section of the terms."),
        ("json:900", None),  # JSON answers and tool calls (demo_json.py), generated
    ),
    steps=300,
    lr=3e-3,
    assistant_only=False,
    seed=1,
)
ADAPTER_PLANS = {
    # the JSON lessons twice: a style adapter keeps closing what it opens (demo_json.py)
    "acme-support": TrainPlan(
        (("demo_acme.txt", None), ("json:360", None), ("json:360", None)), steps=60, lr=1e-2,
        assistant_only=True, seed=2,
    ),
    "globex-legal": TrainPlan(
        (("demo_globex.txt", None), ("json:360", None), ("json:360", None)), steps=60,
        lr=1e-2, assistant_only=True, seed=3,
    ),
}

Message = tuple[str, str]  # (role, content)
Log = Callable[[str], None]


def write_demo(
    out_dir: Path, *, steps: int | None = None, force: bool = False, log: Log = print
) -> None:
    """Write the demo model and adapters into `out_dir` (skipped if already complete).

    `steps` overrides the number of optimizer steps of every training run (for fast tests).
    """
    build = functools.partial(_build, steps=steps, log=log)
    write_atomically(Path(out_dir), build, "demo model", force=force, log=log)


def write_atomically(
    out_dir: Path, build: Callable[[Path], None], what: str, *, force: bool = False,
    log: Log = print,
) -> None:
    """Run `build` on a sibling temporary folder, then rename it to `out_dir` (skipped when
    `out_dir` already holds a config.json, unless `force`)."""
    if (out_dir / "config.json").exists() and not force:
        log(f"{what} already present in {out_dir}; pass force to rebuild")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no config.json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{what} written to {out_dir}")


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f"{dst.name}.old{os.getpid()}")
    if dst.exists():
        dst.rename(old)
    try:
        src.rename(dst)
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- corpus and chat format


def load_dialogues(name: str) -> list[list[Message]]:
    """Dialogues of a corpus file: blocks split by blank lines, one `role: content` per line;
    `json:N`: N generated JSON answers and tool calls (demo_json.py)."""
    if name.startswith("json:"):
        from backends.local.commands import demo_json

        return demo_json.dialogues(int(name[len("json:"):]), seed=11)
    dialogues: list[list[Message]] = []
    current: list[Message] = []
    for raw in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line:
            if current:
                dialogues.append(current)
            current = []
            continue
        role, sep, content = line.partition(": ")
        if not sep or role not in ("system", "user", "assistant"):
            raise ValueError(f"{name}: malformed corpus line {line!r}")
        current.append((role, content))
    if current:
        dialogues.append(current)
    return dialogues


def render_chat(
    messages: list[Message], *, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """CHAT_TEMPLATE in Python: the text, and character spans of each assistant reply + end."""
    parts, spans, n = [BOS], [], len(BOS)
    for role, content in messages:
        head = f"{TURN_START}{role}\n"
        body = f"{content}{TURN_END}"
        if role == "assistant":
            spans.append((n + len(head), n + len(head) + len(body)))
        parts += [head, body, "\n"]
        n += len(head) + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{TURN_START}assistant\n")
    return "".join(parts), spans


def tokenizer_config() -> dict[str, Any]:
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": TURN_END,
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _with_system(messages: list[Message], system: str | None) -> list[Message]:
    if system is None or (messages and messages[0][0] == "system"):
        return messages
    return [("system", system), *messages]


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, over {VOCAB_SIZE}")
    return tok


def encode_dialogue(
    tok: Any, messages: list[Message], assistant_only: bool
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered dialogue and, per token, whether it carries loss."""
    text, spans = render_chat(messages)
    enc = tok.encode(text, add_special_tokens=False)
    if not assistant_only:
        return list(enc.ids), [True] * len(enc.ids)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return list(enc.ids), mask


# ---------------------------------------------------------------- training


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det)


def _batches(
    rows: list[tuple[list[int], list[bool]]], plan: TrainPlan, steps: int
) -> Iterator[tuple[list[list[int]], list[list[int]]]]:
    """`steps` batches [BATCH, SEQ_LEN]: whole dialogues in shuffled order, packed into rows
    that each open with BOS at position 0, then padded. Labels are -100 where no loss."""
    rng = random.Random(plan.seed)
    order: list[int] = []
    for _ in range(steps):
        ids_b, labels_b = [], []
        for _ in range(BATCH):
            ids: list[int] = []
            labels: list[int] = []
            while True:
                if not order:
                    order = list(range(len(rows)))
                    rng.shuffle(order)
                d_ids, d_mask = rows[order[-1]]
                if len(d_ids) > SEQ_LEN:  # its end (the answer) kept, after BOS
                    d_ids = d_ids[:1] + d_ids[len(d_ids) - SEQ_LEN + 1:]
                    d_mask = d_mask[:1] + d_mask[len(d_mask) - SEQ_LEN + 1:]
                if ids and len(ids) + len(d_ids) > SEQ_LEN:
                    break
                order.pop()
                ids += d_ids
                labels += [t if m else -100 for t, m in zip(d_ids, d_mask, strict=True)]
            pad = SEQ_LEN - len(ids)
            ids_b.append(ids + [PAD_ID] * pad)
            labels_b.append(labels + [-100] * pad)
        yield ids_b, labels_b


def _train(
    model: Any,
    params: list[Any],
    rows: list[tuple[list[int], list[bool]]],
    plan: TrainPlan,
    steps: int,
    label: str,
    log: Log,
) -> None:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, min(20, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    every = max(1, steps // 5)
    for step, (ids_b, lab_b) in enumerate(_batches(rows, plan, steps)):
        ids = torch.tensor(ids_b)
        labels = torch.tensor(lab_b)
        logits = model.forward_full(ids)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"  {label}: step {step + 1}/{steps} loss {loss.item():.3f}")


class _Lora:
    """LoRA on the attention projections of a frozen model: y = base(x) + scale * (x @ A.T) @ B.T
    with A [r, in] and B [out, r] (PEFT's layout). Each projection's `forward` is wrapped on the
    instance, so it applies however the model calls the projection (`proj(x)`, `proj.forward(x)`)."""

    def __init__(self, model: Any, seed: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.scale = LORA_ALPHA / LORA_RANK
        self.weights: dict[str, Any] = {}
        self.projs: list[Any] = []
        for i, layer in enumerate(model.model.layers):
            for target in LORA_TARGETS:
                proj = getattr(layer.self_attn, target)
                bound = 1.0 / math.sqrt(proj.in_features)  # PEFT's kaiming-uniform init of A
                a = (torch.rand(LORA_RANK, proj.in_features, generator=gen) * 2 - 1) * bound
                b = torch.zeros(proj.out_features, LORA_RANK)
                prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
                self.weights[f"{prefix}.lora_A.weight"] = a.requires_grad_()
                self.weights[f"{prefix}.lora_B.weight"] = b.requires_grad_()
                proj.forward = self._wrap(proj.forward, a, b)
                self.projs.append(proj)

    def _wrap(self, base: Callable[..., Any], a: Any, b: Any) -> Callable[..., Any]:
        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            return base(x, *args, **kwargs) + (x @ a.t() @ b.t()) * self.scale

        return forward

    def remove(self) -> None:
        for proj in self.projs:
            del proj.forward  # back to the class's method


# ---------------------------------------------------------------- writing


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_tensors(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: t.detach().to("cpu").contiguous().clone() for k, t in sorted(tensors.items())},
        str(path),
        metadata={"format": "pt"},
    )


def adapter_config() -> dict[str, Any]:
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": MODEL_NAME,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": LORA_RANK,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _build(out: Path, steps: int | None, log: Log) -> None:
    import torch

    from backends.hf.config import ArchConfig
    from backends.local.model import Llama

    files = sorted({f for plan in (BASE_PLAN, *ADAPTER_PLANS.values()) for f, _ in plan.corpora})
    corpora = {f: load_dialogues(f) for f in files}
    clock = time.monotonic()
    log("training tokenizer")
    texts = [render_chat(d)[0] for f in files for d in corpora[f]]
    tok = _train_tokenizer(texts)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    _write_json(
        out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": TURN_END, "pad_token": PAD}
    )

    cfg = ArchConfig.from_hf(MODEL_SHAPE)
    hf = {
        **cfg.to_hf(),
        "pad_token_id": PAD_ID,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": TURN_END_ID, "pad_token_id": PAD_ID},
    )

    def rows_of(plan: TrainPlan) -> list[tuple[list[int], list[bool]]]:
        return [
            encode_dialogue(tok, _with_system(d, system), plan.assistant_only)
            for f, system in plan.corpora
            for d in corpora[f]
        ]

    with _deterministic_torch(BASE_PLAN.seed):
        model = Llama(cfg)
        model.train()
        n = steps if steps is not None else BASE_PLAN.steps
        log(f"training base model ({sum(p.numel() for p in model.parameters()):,} parameters)")
        params = list(model.parameters())
        _train(model, params, rows_of(BASE_PLAN), BASE_PLAN, n, "base", log)
        _save_tensors(out / "model.safetensors", model.state_dict())
        log(f"  base: done at {time.monotonic() - clock:.0f} s")
        for p in params:
            p.requires_grad_(False)
        for name, plan in ADAPTER_PLANS.items():
            torch.manual_seed(plan.seed)
            lora = _Lora(model, plan.seed)
            n = steps if steps is not None else plan.steps
            log(f"training adapter {name}")
            try:
                _train(model, list(lora.weights.values()), rows_of(plan), plan, n, name, log)
            finally:
                lora.remove()
            adir = out / "adapters" / name
            adir.mkdir(parents=True)
            _save_tensors(adir / "adapter_model.safetensors", lora.weights)
            _write_json(adir / "adapter_config.json", adapter_config())
            log(f"  {name}: done at {time.monotonic() - clock:.0f} s")
    _write_json(out / "config.json", hf)  # last: its presence marks a complete model
