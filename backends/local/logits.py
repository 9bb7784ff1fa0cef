"""What a request does to one sequence's logits before sampling, and the log probabilities it
asks back: logit_bias, repetition_penalty (over the prompt and the output, as vLLM and
transformers apply it), the grammar's mask (backends/local/grammar.py); then, after the
sampler's penalties, the chosen token's log probability and the top alternatives.

The Sampler calls `apply` before its own penalties and temperature, `observe` with each
token taken, and `record` with the logits it sampled from and the token it took.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.local.grammar import Constraint

TokenText = Callable[[int], str]


@dataclass
class Processors:
    vocab_size: int
    bias: dict[int, float] = field(default_factory=dict)
    repetition_penalty: float = 1.0
    constraint: Constraint | None = None
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token and k others
    token_text: TokenText | None = None  # a token id's text (for logprob entries)
    prompt_ids: Sequence[int] = ()
    skip: frozenset[int] = frozenset()  # tokens without a logprob entry (the end of sequence)
    entries: list[dict[str, Any]] = field(default_factory=list)  # one per token taken
    _bias: torch.Tensor | None = None
    _seen: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bias:
            self._bias = torch.zeros(self.vocab_size)
            for token, value in self.bias.items():
                self._bias[token] = value
        if self.repetition_penalty != 1.0:
            self._seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            ids = [t for t in self.prompt_ids if 0 <= t < self.vocab_size]
            self._seen[ids] = True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] float32 (CPU, the sampler's copy) -> the logits to sample from."""
        if self._bias is not None:
            logits = logits + self._bias[: logits.numel()]
        if self._seen is not None:
            seen = self._seen[: logits.numel()]
            p = self.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
        if self.constraint is not None:
            logits = logits.masked_fill(~self.constraint.allowed()[: logits.numel()], float("-inf"))
        return logits

    def observe(self, token: int) -> None:
        if self._seen is not None and 0 <= token < self.vocab_size:
            self._seen[token] = True
        if self.constraint is not None:
            self.constraint.accept(token)

    def force(self, token: int) -> bool:
        """Take a token the grammar forces (not sampled): False when the grammar refuses it.
        Its logprob entry (when asked) is 0: under the grammar it was certain."""
        if self.constraint is not None and not self.constraint.accept(token):
            return False
        if self._seen is not None and 0 <= token < self.vocab_size:
            self._seen[token] = True
        if self.top_logprobs is not None and token not in self.skip:
            entry = _entry((self.token_text or str)(token), 0.0)
            entry["top_logprobs"] = [dict(entry)] if self.top_logprobs > 0 else []
            self.entries.append(entry)
        return True

    def record(self, logits: torch.Tensor, token: int) -> None:
        """The logprob entry of `token` (chat's shape), when the request asks for logprobs."""
        if self.top_logprobs is None or token in self.skip:
            return
        text = self.token_text or str
        logp = torch.log_softmax(logits, dim=-1)
        entry = _entry(text(token), float(logp[token]))
        if self.top_logprobs > 0:
            values, ids = torch.topk(logp, min(self.top_logprobs, logp.numel()))
            entry["top_logprobs"] = [_entry(text(int(i)), float(v))
                                     for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
        else:
            entry["top_logprobs"] = []
        self.entries.append(entry)


def _entry(token: str, logprob: float) -> dict[str, Any]:
    # -inf (a token the grammar or a -100 bias excludes) is not JSON: OpenAI's floor instead
    return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode())}
