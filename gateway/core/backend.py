"""The one interface every backend kind implements, and what a backend reports: capacity,
memory by component, counters."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from gateway.core.context import Chunk, RequestContext
from gateway.core.kv import Lanes


@dataclass(slots=True)
class MemorySnapshot:
    """Bytes by component. `other` = measured - the rest (None where nothing is measured)."""

    # weights, as disjoint copies: served from the mapped checkpoint files (shared page cache);
    # copies on the heap or device (converted, quantized at load, packed); resident pages of the
    # mapped files that serve nothing (a copy's source not given back: 0 when held once)
    weights: int = 0
    weights_heap: int = 0
    weights_source: int = 0
    adapters: dict[str, int] = field(default_factory=dict)
    kv_used: int = 0
    kv_free: int = 0
    workspace: int = 0
    runtime: int = 0  # measured before weights load (interpreter, libraries); local only
    kv_swapped: int = 0  # host copies of preempted sequences' KV (within swap_bytes); local only
    # compiled grammars cached, by cache scope (tenant, or "(shared)"); local only
    grammar_cache: dict[str, int] = field(default_factory=dict)
    # the grammar compile worker processes (PSS), added to `measured`; local only
    grammar_workers: int = 0
    measured: int | None = None

    @property
    def other(self) -> int | None:
        if self.measured is None:
            return None
        return self.measured - (
            self.weights
            + self.weights_heap
            + self.weights_source
            + sum(self.adapters.values())
            + self.kv_used
            + self.kv_free
            + self.workspace
            + self.runtime
            + self.kv_swapped
            + sum(self.grammar_cache.values())
            + self.grammar_workers
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
    # The KV cache is another server's that every gateway process sends to (vLLM): admission
    # leases it fleet-wide with shared_state, and its gauges are exported once, not summed.
    shared: bool = False
    # What KV admission reserves for the output: the limit ("worst_case") or the estimate
    # ("estimate": the backend preempts when one was wrong); gateway/core/kv.kv_output_tokens.
    kv_admission: str = "worst_case"
    lanes: Lanes | None = None  # long requests may hold at most lanes.long_cap(kv_bytes_total)
    swap_bytes_total: int = 0  # host bytes for preempted sequences' KV (swap_bytes); 0: none


@dataclass(slots=True)
class BackendStats:
    """Counters and queue sizes a backend may report for telemetry (None: not known)."""

    waiting: int | None = None  # requests queued inside the backend
    running: int | None = None  # requests in the current batch
    adapter_loads: int | None = None  # cumulative: adapters read from storage
    adapter_hits: int | None = None  # cumulative: requests whose adapter was resident
    adapter_evictions: int | None = None  # cumulative
    adapters_pinned: dict[str, int] | None = None  # adapter -> requests holding it now
    upstream_retries: int | None = None  # cumulative: retries of calls to an upstream
    upstream_failures: int | None = None  # cumulative: upstream failures (connect errors, 5xx)
    kv_swapped_bytes: int | None = None  # host bytes holding preempted sequences' KV now
    kv_preemptions: int | None = None  # cumulative: sequences preempted when the KV ran short
    kv_swap_outs: int | None = None  # cumulative: preemptions whose KV went to host swap space
    kv_recomputes: int | None = None  # cumulative: preemptions whose KV was dropped (recomputed)
    kv_resumes: int | None = None  # cumulative: preempted sequences that resumed
    prefix_query_tokens: int | None = None  # cumulative: prompt tokens that could hit the cache
    prefix_hit_tokens: int | None = None  # cumulative: prompt tokens served from cached KV blocks


class Backend(Protocol):
    """Every backend kind. A kind is a class built as `Kind(name, Kind.Config(...))` (its own
    frozen config dataclass, validated by gateway/settings.py) and registered by import path
    in backends/registry.py."""

    name: str
    Config: ClassVar[type[Any]]

    def __init__(self, name: str, cfg: Any) -> None: ...

    async def start(self) -> None:
        """Load what is needed (weights, connections). Called once by the app lifespan."""

    def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        """The only generation path. Cancelling the iteration frees everything it held."""

    def forwards(self, kind: str) -> bool:
        """True: a request of this kind ("chat", "completion", "responses", "embeddings") goes
        to the backend as the client sent it (remote kinds); False: the gateway serves it
        over chat completions (Responses on the local engine, or toward an upstream with
        responses_api: via_chat)."""

    def count_tokens(self, ctx: RequestContext) -> int | None:
        """Prompt tokens for ctx (after the chat template), or None if unknown."""

    def capacity(self) -> Capacity | None: ...

    def adapters(self) -> dict[str, int] | None:
        """Adapters this backend can serve -> bytes they take when loaded; None: unknown."""

    def memory(self) -> MemorySnapshot: ...

    def stats(self) -> BackendStats:
        """Queue sizes and adapter cache counters; cheap, called at every metrics scrape."""

    async def ensure_adapter(self, name: str) -> None: ...

    def available(self) -> bool:
        """In rotation: False while a kind that can fail over (a remote upstream after a
        failure, until its re-probe passes) should not be sent requests."""

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...
