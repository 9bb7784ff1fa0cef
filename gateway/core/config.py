"""What the policies and the gateway both read of the config: the public models (tiers) and
the tenants with their limits. Validated by gateway/settings.py's dataclass walker."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


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


@dataclass(frozen=True)
class TenantLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None
    max_kv_share: float | None = None  # of each backend's KV bytes, 0 < share <= 1

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrency"):
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
    # a file of comma- or newline-separated keys (a mounted Kubernetes Secret; scale-out)
    api_keys_file: str | None = None

    def key_hashes(self) -> tuple[bytes, ...]:
        """sha256 digests of every key this tenant may use (config hashes + env keys)."""
        digests = [bytes.fromhex(h) for h in self.api_key_sha256]
        if self.api_keys_env:
            for key in os.environ.get(self.api_keys_env, "").split(","):
                if key.strip():
                    digests.append(hashlib.sha256(key.strip().encode()).digest())
        if self.api_keys_file:
            try:
                text = Path(self.api_keys_file).read_text()
            except OSError:
                text = ""  # no keys: the tenant cannot authenticate until the file exists
            for key in text.replace("\n", ",").split(","):
                if key.strip():
                    digests.append(hashlib.sha256(key.strip().encode()).digest())
        return tuple(digests)
