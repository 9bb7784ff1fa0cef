"""Next-token choice for one sequence: greedy, or temperature + top_p with OpenAI penalties.

Each sequence owns a `torch.Generator` seeded from its request's seed, so the same seed gives
the same tokens whatever else is in flight.
"""

from __future__ import annotations

import secrets

import torch

from backends.local.logits import Processors


class Sampler:
    """Sampling state of one sequence (its generator and, with penalties, its token counts)."""

    def __init__(
        self,
        vocab_size: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        top_k: int = 0,  # 0: off
        min_p: float = 0.0,
        processors: Processors | None = None,  # bias, repetition, grammar, logprobs
    ) -> None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if top_k < 0 or not 0.0 <= min_p <= 1.0:
            raise ValueError("top_k must be >= 0 and min_p in [0, 1]")
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.processors = processors
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed % (2**63) if seed is not None else secrets.randbits(63))
        self._counts: torch.Tensor | None = (
            torch.zeros(vocab_size, dtype=torch.float32)
            if presence_penalty or frequency_penalty
            else None
        )

    @property
    def greedy(self) -> bool:
        # Below this, logits / T overflows float32 (1e-289 even rounds to 0): the softmax is
        # a one-hot on the argmax anyway, so take it directly.
        return self.temperature < 1e-4

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties or processors (bias, grammar, logprobs): the token is the
        logits' argmax (taken for the batch)."""
        return self.greedy and self._counts is None and self.processors is None

    def observe(self, token: int) -> None:
        """Record a generated token (for presence/frequency penalties)."""
        if self._counts is not None and 0 <= token < self._counts.numel():
            self._counts[token] += 1
        if self.processors is not None:
            self.processors.observe(token)

    def forced(self) -> list[tuple[int, bool]]:
        """Tokens the grammar forces next, each with whether it is a tool call's wrapper
        (grammar.Constraint.forced); empty without a grammar."""
        constraint = self.processors.constraint if self.processors is not None else None
        return constraint.forced() if constraint is not None else []

    def force(self, token: int) -> bool:
        """Take a forced token without sampling (counted for the penalties); False when the
        grammar refuses it (then nothing changed)."""
        if self.processors is not None and not self.processors.force(token):
            return False
        if self._counts is not None and 0 <= token < self._counts.numel():
            self._counts[token] += 1
        return True

    def sample(self, logits: torch.Tensor) -> int:
        """logits [V] float32 (on any device) -> the next token id."""
        logits = logits.float().cpu()
        if self.processors is not None:
            logits = self.processors.apply(logits)
        if self._counts is not None:
            counts = self._counts[: logits.numel()]
            logits = (
                logits
                - self.frequency_penalty * counts
                - self.presence_penalty * (counts > 0).float()
            )
        token = self._choose(logits)
        if self.processors is not None:
            self.processors.record(logits, token)
        return token

    def _choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logits).item())
        if self.top_k and self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        # Shift by the max first: a tiny temperature then sends the others to -inf, not NaN.
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.min_p > 0:
            probs = probs * (probs >= self.min_p * probs.max())
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < self.top_p
            keep[0] = True
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=self.generator)
            return int(order[choice].item())
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
