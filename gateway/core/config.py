"""What the policies and the gateway both read of the config: the public models (tiers) and
the tenants with their limits. Validated by gateway/settings.py's dataclass walker."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from gateway.core.rollout_config import RolloutConfig


@dataclass(frozen=True)
class Price:
    """What a million tokens cost, for usage records (`models[].price`); any currency."""

    input_per_1m: float = 0.0
    output_per_1m: float = 0.0
    cached_input_per_1m: float | None = None  # None: cached prompt tokens cost input_per_1m

    def __post_init__(self) -> None:
        if min(self.input_per_1m, self.output_per_1m, self.cached_input_per_1m or 0.0) < 0:
            raise ValueError("price: amounts must be >= 0")

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached_rate = self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m
        return ((prompt_tokens - cached_tokens) * self.input_per_1m
                + cached_tokens * cached_rate + completion_tokens * self.output_per_1m) / 1e6


@dataclass(frozen=True)
class ModelConfig:
    """A public model: one backend (`backend: a`) or several replicas (`backends: [a, b]`).

    After validation both are set: `backends` lists the replicas, `backend` is the first
    (the one policies read before routing picks a replica; see policies/routing.py).
    """

    name: str
    backend: str = ""  # "" when the model lists replicas instead (set to the first below)
    degrade_to: str | None = None
    backends: tuple[str, ...] = ()
    price: Price | None = None  # usage records' cost (operations)
    rollout: RolloutConfig | None = None  # a candidate tier's rollout (gateway/rollout/)

    def __post_init__(self) -> None:
        if self.backend and self.backends:
            raise ValueError(f"model {self.name!r}: give backend or backends, not both")
        if not self.backend and not self.backends:
            raise ValueError(f"model {self.name!r}: give backend (one) or backends (replicas)")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"model {self.name!r}: backends lists a replica twice")
        if self.backends:
            object.__setattr__(self, "backend", self.backends[0])
        else:
            object.__setattr__(self, "backends", (self.backend,))


BUDGET_PERIODS = ("day", "week", "month")  # calendar periods in UTC; weeks start on Monday


@dataclass(frozen=True)
class Budget:
    """`limits.budget`: what a tenant may spend per calendar period, in the models' price unit
    (policies/budget.py holds it)."""

    amount: float
    period: str = "month"

    def __post_init__(self) -> None:
        if not self.amount > 0:
            raise ValueError("limits.budget.amount must be > 0")
        if self.period not in BUDGET_PERIODS:
            raise ValueError(f"limits.budget.period must be one of {', '.join(BUDGET_PERIODS)}")


def degrade_chain(models: Mapping[str, ModelConfig], name: str) -> Iterator[ModelConfig | None]:
    """The model `name`, then each tier it degrades to, once each (a cycle ends the walk);
    None for a name no model has, and the walk ends there."""
    seen: set[str] = set()
    current: str | None = name
    while current is not None and current not in seen:
        seen.add(current)
        model = models.get(current)
        yield model
        current = model.degrade_to if model is not None else None


@dataclass(frozen=True)
class TenantLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None
    max_kv_share: float | None = None  # of each backend's KV bytes, 0 < share <= 1
    # a request asking a longer answer is a 400; one naming no limit gets this one (the one
    # documented rewrite of a request: sent upstream, said in x-gateway-max-output-tokens)
    max_output_tokens: int | None = None
    budget: Budget | None = None  # spend per calendar period (policies/budget.py)

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrency",
                     "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"limits.{name} must be at least 1")
        if self.max_kv_share is not None and not 0 < self.max_kv_share <= 1:
            raise ValueError("limits.max_kv_share must be in (0, 1]")


TRIM_STRATEGIES = ("drop_oldest", "middle_out", "none")


@dataclass(frozen=True)
class TrimConfig:
    """context_trim per tenant: which turns go first, and whether to fit max_kv_share too."""

    strategy: str = "drop_oldest"  # drop_oldest | middle_out (keep first and last) | none
    fit_kv_share: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in TRIM_STRATEGIES:
            raise ValueError(f"trim.strategy must be one of {', '.join(TRIM_STRATEGIES)}")


PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}  # admission queues, engine preemption


@dataclass(frozen=True)
class TenantConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("api_keys_file",)  # relative to the config file

    name: str
    api_keys_env: str | None = None
    api_key_sha256: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    adapters: dict[str, str] = field(default_factory=dict)
    allowed_adapters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "model:adapter"
    priority: str = "normal"
    limits: TenantLimits = field(default_factory=TenantLimits)
    allow_degrade: bool = True
    trim: TrimConfig = field(default_factory=TrimConfig)
    # forwarded to a Gateway API Inference Extension as x-gateway-inference-objective
    inference_objective: str | None = None
    # one key or sha256 digest a line, re-read at every reload (operations)
    api_keys_file: str | None = None
    weight: float = 1.0  # fair share among backlogged tenants of one priority (policies/fair_share.py)
    shed_low: bool = False  # refuse (429) this tenant's `low` requests instead of queueing them

    def key_hashes(self) -> tuple[bytes, ...]:
        """sha256 digests of every key this tenant may use (config hashes, env keys, the keys
        file). A keys file that cannot be read or has a bad line raises KeyFileError."""
        digests = [bytes.fromhex(h) for h in self.api_key_sha256]
        if self.api_keys_env:
            for key in os.environ.get(self.api_keys_env, "").split(","):
                if key.strip():
                    digests.append(hashlib.sha256(key.strip().encode()).digest())
        if self.api_keys_file:
            digests.extend(read_keys_file(self.api_keys_file))
        return tuple(digests)


class KeyFileError(ValueError):
    """A keys file cannot be read or has a bad line; the message never quotes a line."""


_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def read_keys_file(path: str) -> list[bytes]:
    """`api_keys_file`: API keys or sha256 hex digests (64 hex digits), one a line or
    comma-separated (a Helm-rendered Secret); blank
    lines and lines starting with # are skipped. Follows symlinks (a Kubernetes Secret mount
    swaps its `..data` link), so each read sees one whole version of the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeyFileError(f"cannot read keys file {path}: {why}") from None
    out: list[bytes] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.strip().startswith("#"):
            continue
        for word in raw.split(","):  # a line may hold several, comma-separated
            key = word.strip()
            if not key:
                continue
            if any(c.isspace() for c in key):
                raise KeyFileError(f"{path} line {n}: a key is one word (no spaces inside)")
            out.append(bytes.fromhex(key) if _DIGEST.fullmatch(key)
                       else hashlib.sha256(key.encode()).digest())
    if not out:
        raise KeyFileError(f"keys file {path} holds no key")
    return out
