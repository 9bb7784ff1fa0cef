"""The one interface every backend kind implements, and the registry of kinds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.context import Chunk, RequestContext
from gateway.errors import BackendError

__all__ = ["Backend", "BackendError", "BackendStats", "Capacity", "MemorySnapshot", "adapter_name",
           "is_available"]


@dataclass(slots=True)
class MemorySnapshot:
    """Bytes by component. `other` = measured - the rest (None where nothing is measured)."""

    weights: int = 0
    adapters: dict[str, int] = field(default_factory=dict)
    kv_used: int = 0
    kv_free: int = 0
    workspace: int = 0
    runtime: int = 0  # measured before weights load (interpreter, libraries); local only
    measured: int | None = None

    @property
    def other(self) -> int | None:
        if self.measured is None:
            return None
        return self.measured - (
            self.weights
            + sum(self.adapters.values())
            + self.kv_used
            + self.kv_free
            + self.workspace
            + self.runtime
        )


@dataclass(slots=True)
class Capacity:
    kv_bytes_total: int
    kv_bytes_free: int
    bytes_per_token: int
    block_size: int
    context_window: int
    adapter_budget_bytes: int = 0
    resident_adapters: list[str] = field(default_factory=list)


@dataclass(slots=True)
class BackendStats:
    """Counters and queue sizes a backend may report for telemetry (None: not known)."""

    waiting: int | None = None  # requests queued inside the backend
    running: int | None = None  # requests in the current batch
    adapter_loads: int | None = None  # cumulative: adapters read from storage
    adapter_hits: int | None = None  # cumulative: requests whose adapter was resident
    adapter_evictions: int | None = None  # cumulative
    adapters_pinned: dict[str, int] | None = None  # adapter -> requests holding it now


class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Load what is needed (weights, connections). Called once by the app lifespan."""

    def generate(self, ctx: RequestContext) -> AsyncIterator[Chunk]:
        """The only generation path. Cancelling the iteration frees everything it held."""

    def count_tokens(self, ctx: RequestContext) -> int | None:
        """Prompt tokens for ctx (after the chat template), or None if unknown."""

    def capacity(self) -> Capacity | None: ...

    def adapters(self) -> dict[str, int] | None:
        """Adapters this backend can serve -> bytes they take when loaded; None: unknown."""

    def memory(self) -> MemorySnapshot: ...

    def stats(self) -> BackendStats:
        """Queue sizes and adapter cache counters; cheap, called at every metrics scrape."""

    async def ensure_adapter(self, name: str) -> None: ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


def adapter_name(fmt: str, model: str, adapter: str) -> str:
    """A remote kind's name for `adapter` on `model`: its `adapter_model` format over {model}
    and {adapter} ("{model}:{adapter}" -> "m:a" for another memgate, "{adapter}" for vLLM,
    "openai/{model}:{adapter}" for litellm). ValueError names a format that is not one."""
    try:
        return fmt.format(model=model, adapter=adapter)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"adapter_model {fmt!r} is not a format over {{model}} and {{adapter}} ({exc})"
        ) from None


def is_available(backend: Any) -> bool:
    """Whether `backend` is in rotation. A kind that can be taken out of rotation (the
    `openai` kind after a failure, until its re-probe passes) has `available() -> bool`;
    a kind without it (the in-process `local` engine) is always in rotation."""
    available = getattr(backend, "available", None)
    return True if available is None else bool(available())


class RemoteBackend:
    """What a backend over someone else's server reports when that server tells it nothing:
    no token counts, capacity, adapter list, memory, counters or adapter loading of its own.
    Kinds that know more (vllm) override the methods they can answer."""

    def count_tokens(self, ctx: RequestContext) -> int | None:
        return None

    def capacity(self) -> Capacity | None:
        return None

    def adapters(self) -> dict[str, int] | None:
        return None  # the upstream decides; adapter names pass through unchecked

    def memory(self) -> MemorySnapshot:
        return MemorySnapshot()

    def stats(self) -> BackendStats:
        return BackendStats()

    async def ensure_adapter(self, name: str) -> None:
        return None


BackendFactory = Any  # a class taking (name: str, config: BackendConfig)
