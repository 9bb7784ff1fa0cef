"""Chat template, BOS handling, and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from backends.hf.tokenizer import ChatTokenizer, TokenizerError

from .conftest import TinyCheckpoint


def stream(tok: ChatTokenizer, prompt: list[int], gen: list[int]) -> list[str]:
    d = tok.detokenizer(prompt)
    pieces = [d.push(t) for t in gen]
    pieces.append(d.flush())
    return pieces


def test_chat_template_and_specials(tiny_checkpoint: TinyCheckpoint) -> None:
    tok = ChatTokenizer.from_dir(tiny_checkpoint.model_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}],
        },
    ]
    text = tok.render_chat(msgs)
    assert text == "<s><|system|>Be brief.</s><|user|>Hello world</s><|assistant|>"
    ids = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.count_chat(msgs) == len(ids)
    assert tok.eos_token_ids == {1}  # from tokenizer_config + generation_config.json
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="text content"):
        tok.render_chat([{"role": "user", "content": [{"type": "image_url"}]}])


def test_completion_adds_bos_once(tiny_checkpoint: TinyCheckpoint) -> None:
    tok = ChatTokenizer.from_dir(tiny_checkpoint.model_dir)
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "Hello world"


def test_byte_level_stream_never_breaks_utf8(tiny_checkpoint: TinyCheckpoint) -> None:
    tok = ChatTokenizer.from_dir(tiny_checkpoint.model_dir)
    text = " crêpes à Tokyo 東京は大きい 🙂 done"
    prompt = tok.encode("Hello:")
    gen = tok.tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream(tok, prompt, gen)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # really incremental


def sentencepiece_like() -> ChatTokenizer:
    """Llama-2 style: '▁' for spaces, byte fallback for unknown characters."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "▁Hello", "▁world", "▁the", "a", "b", "c", "!", "▁é"]:
        vocab[piece] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyzHW":
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return ChatTokenizer(tk, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})


def test_sentencepiece_stream_keeps_spaces_and_bytes() -> None:
    tok = sentencepiece_like()
    prompt = tok.encode("Hello")
    assert prompt[0] == 1
    gen = tok.tokenizer.encode("world the 東 cab!", add_special_tokens=False).ids
    pieces = stream(tok, prompt, gen)
    whole = tok.decode(prompt + gen)
    assert "".join(pieces) == whole[len(tok.decode(prompt)) :]
    assert "".join(pieces).startswith(" world")
    assert all("\ufffd" not in p for p in pieces)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        ChatTokenizer.from_dir(tmp_path)
