"""Tokenizer, chat template and streaming detokenizer for a Hugging Face checkpoint directory."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# How many prompt tokens seed the detokenizer so the first generated token keeps its space.
DETOK_CONTEXT = 5


class TokenizerError(ValueError):
    """The tokenizer files are missing/malformed or a chat template failed."""


class TooManyTokens(Exception):
    """A text encodes to more tokens than `max_ids` (the model's context window); `count`
    is a lower bound, counted until the window was surely passed. Its ids are never made
    into a Python list (800,000 of them took 50 ms holding the GIL, every other thread of the
    process waiting)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} tokens")
        self.count = count


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        content = v.get("content")
        return str(content) if content is not None else None
    return None if v is None else str(v)


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise TokenizerError("only text content parts are supported")
            parts.append(str(p.get("text", "")))
        return "".join(parts)
    raise TokenizerError(f"unsupported message content of type {type(content).__name__}")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTokenizer:
    """tokenizer.json + tokenizer_config.json (chat template, special tokens) + eos ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: dict[str, Any],
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_ids: int | None = None  # more tokens than this: TooManyTokens (the window)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id(self.bos_token)
        eos = set(eos_token_ids)
        eos_id = self._id(self.eos_token)
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self._template_src: str | None = template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = lambda x, indent=None: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        self._template = env.from_string(template) if template else None

    @classmethod
    def from_dir(cls, model_dir: str | Path, eos_token_ids: Iterable[int] = ()) -> ChatTokenizer:
        d = Path(model_dir)
        tok_path = d / "tokenizer.json"
        if not tok_path.exists():
            raise TokenizerError(f"{d}: no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tok_path))
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").exists():
            config = json.loads((d / "tokenizer_config.json").read_text())
        if "chat_template" not in config and (d / "chat_template.jinja").exists():
            config["chat_template"] = (d / "chat_template.jinja").read_text()
        eos = set(eos_token_ids)
        gen = d / "generation_config.json"
        if gen.exists():
            g = json.loads(gen.read_text()).get("eos_token_id")
            eos.update(g if isinstance(g, list) else [] if g is None else [g])
        return cls(tokenizer, config, eos)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain text (completions): the tokenizer's own specials, plus BOS where configured."""
        ids: list[int] = _encode(self.tokenizer, text, add_special_tokens, self.max_ids)
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def render_chat(self, messages: Sequence[dict[str, Any]],
                    tools: Sequence[dict[str, Any]] | None = None,
                    extra: dict[str, Any] | None = None) -> str:
        """The prompt text of `messages` (and `tools`, for a template that renders them);
        `extra`: a request's chat_template_kwargs, given to the template as variables."""
        if self._template is None:
            raise TokenizerError("this model's tokenizer_config.json has no chat_template")
        msgs = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise TokenizerError("each message needs a role")
            role = "system" if m["role"] == "developer" else m["role"]
            msgs.append({**m, "role": role, "content": message_text(m.get("content"))})
        try:
            return self._template.render(
                **(extra or {}),
                messages=msgs,
                tools=list(tools) if tools else None,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                add_generation_prompt=True,
            )
        except (TemplateError, TypeError) as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: Sequence[dict[str, Any]],
                    tools: Sequence[dict[str, Any]] | None = None,
                    extra: dict[str, Any] | None = None) -> list[int]:
        """Chat messages through the template; the template writes its own specials."""
        text = self.render_chat(messages, tools, extra)
        return _encode(self.tokenizer, text, False, self.max_ids)

    def count_chat(self, messages: Sequence[dict[str, Any]],
                   tools: Sequence[dict[str, Any]] | None = None) -> int:
        return len(self.encode_chat(messages, tools))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def detokenizer(self, prompt_ids: Sequence[int]) -> Detokenizer:
        return Detokenizer(self, list(prompt_ids[-DETOK_CONTEXT:]))


class Detokenizer:
    """Incremental decoding that never emits a partial UTF-8 character.

    Text is decoded over a small window of previous tokens, so tokenizers whose decoders depend
    on context (sentencepiece's leading "▁", byte-level BPE pieces of one character) yield the
    same text as decoding everything at once. Output ending in U+FFFD is held back until the
    character completes.
    """

    def __init__(self, tok: ChatTokenizer, context: list[int]) -> None:
        self._tok = tok
        self._ids = list(context)
        self._prefix = 0  # start of the decoding window
        self._read = len(context)  # end of what has been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text ("" if held back)."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (may contain U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(prefix_text) :] if len(full) > len(prefix_text) else ""


# Above this many characters a text is encoded through encode_batch, which releases the GIL
# while the Rust side works (encode holds it: a 4 MB prompt froze every other thread of the
# process for 4 s, the event loop included); below it, encode, which costs less per call.
GIL_FREE_CHARS = 16 * 1024


# A long text is first counted in pieces of about this many characters (cut before a space):
# a piece's encoding is freed before the next is made, and the count stops once it is past the
# window, so what a text longer than the model's window costs is bounded by the window, not by
# the text (a 3.5 MB prompt: 2.5 CPU-s and 330 MB of encoding, held by the allocator after).
PIECE_CHARS = 64 * 1024
PIECE_SLACK = 8  # tokens a cut may add (a prefix space, a merge split in two)


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool,
            max_ids: int | None) -> list[int]:
    if max_ids is not None and len(text) > GIL_FREE_CHARS:
        _count_past(tokenizer, text, add_special_tokens, max_ids)
    if len(text) > GIL_FREE_CHARS:
        encoding = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    else:
        encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if max_ids is not None and len(encoding) > max_ids:
        raise TooManyTokens(len(encoding))
    return list(encoding.ids)


def _count_past(tokenizer: Tokenizer, text: str, add_special_tokens: bool, max_ids: int) -> None:
    """TooManyTokens as soon as the pieces counted so far are surely past `max_ids` (their
    count less the slack of every cut); otherwise return, and the caller encodes the whole
    text exactly (it is then at most about max_ids tokens)."""
    start, pieces, total = 0, 0, 0
    while start < len(text):
        end = min(len(text), start + PIECE_CHARS)
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        piece = tokenizer.encode_batch([text[start:end]],
                                       add_special_tokens=add_special_tokens and start == 0)[0]
        total += len(piece)
        pieces += 1
        if total - PIECE_SLACK * pieces > max_ids:
            raise TooManyTokens(total - PIECE_SLACK * pieces)
        start = end
