"""routing: which replica of its tier serves each request, and the replica a request falls
back to when its replica failed before the first byte.

A model may list several backends (`backends: [a, b]`), replicas of one tier. The router
sends a request to a replica that already holds its adapter when that replica has room,
else to the least loaded one, so adapters do not thrash across replicas:
- "holds": the replica reports the adapter in capacity().resident_adapters, or (for kinds
  that cannot see upstream residency, such as `openai`) the router sent this adapter there
  before (an adapter -> replica affinity map);
- "room": its requests in flight are fewer than the least loaded replica's +
  routing.spill_inflight, and it reports free KV bytes when it reports capacity at all;
- "least loaded": fewest requests in flight, then fewest adapters bound to it (spreads
  adapters across replicas), then config order;
- replicas out of rotation (Backend.available() is False, e.g. an `openai` upstream that
  failed and has not passed its re-probe yet) are skipped; when every replica is out, all
  are candidates (the request then fails fast and the pipeline may fall back).

The Router lives on PolicyEnv (one per chain) because degrade re-routes when it switches
tiers; whoever routes a request releases it in on_finish (release is idempotent). Plain
Python: the counts are per gateway process (each worker routes on what it sends).

In the default chain routing runs right after adapter_selection, so context_trim, degrade and
admission see the chosen replica (its tokenizer, its KV pool in the reservations). Fallback: a
request whose replica failed before its first byte (a 5xx, a refused connection, a timeout)
is taken over by another replica of the same tier, in rotation, that has not failed it; the
chain then runs again on it (degrade's fallback to a smaller tier comes after, when no
replica is left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core.backend import Backend
from gateway.core.config import ModelConfig
from gateway.core.context import Decision, RequestContext
from gateway.core.errors import BackendError
from gateway.core.policy import Outcome, modified, passed


@dataclass(frozen=True)
class RoutingConfig:
    # A replica keeps the adapters it holds while its requests in flight are fewer than the
    # least loaded replica's + spill_inflight (and it reports free KV); beyond, spill over.
    spill_inflight: int = 4

    def __post_init__(self) -> None:
        if self.spill_inflight < 0:
            raise ValueError("routing.spill_inflight must be >= 0")


class Router:
    """Which replica serves a request; one per chain (PolicyEnv.router), plain Python."""

    def __init__(self, spill_inflight: int = RoutingConfig.spill_inflight) -> None:
        self.spill_inflight = spill_inflight
        self.inflight: dict[str, int] = {}
        self.affinity: dict[tuple[str, str], str] = {}  # (model, adapter) -> replica
        self._held: dict[int, str] = {}  # id(ctx) -> the replica it counts against
        # with shared_state: a new binding is published to the other gateway processes, and
        # theirs arrive through merge_affinity (policies/redis_quotas.py)
        self.publish: Callable[[str, str], None] | None = None

    def merge_affinity(self, bindings: Mapping[str, str]) -> None:
        """The fleet's bindings ("model:adapter" -> replica) replace this process's."""
        for key, replica in bindings.items():
            model, _, adapter = key.partition(":")
            self.affinity[(model, adapter)] = replica

    def route(self, ctx: RequestContext, model: ModelConfig, backends: Mapping[str, Backend]) -> str:
        """Pick a replica of `model` for ctx, set ctx.backend and count it in flight."""
        self.release(ctx)
        if ctx.rollout_backend is not None and model.name == ctx.requested_model:
            choice = ctx.rollout_backend  # a rollout's candidate serves it (gateway/rollout/)
        else:
            choice = self.pick(ctx.adapter, model, backends, exclude=ctx.failed_backends)
        ctx.backend = choice
        self.inflight[choice] = self.inflight.get(choice, 0) + 1
        self._held[id(ctx)] = choice
        if ctx.adapter is not None and len(model.backends) > 1:
            key = (model.name, ctx.adapter)
            if self.affinity.get(key) != choice:
                self.affinity[key] = choice
                if self.publish is not None:
                    self.publish(f"{model.name}:{ctx.adapter}", choice)
        return choice

    def release(self, ctx: RequestContext) -> None:
        held = self._held.pop(id(ctx), None)
        if held is not None:
            self.inflight[held] -= 1

    def pick(self, adapter: str | None, model: ModelConfig, backends: Mapping[str, Backend],
             exclude: Sequence[str] = ()) -> str:
        """`exclude`: replicas that already failed this request (they serve it only if no
        other replica is left)."""
        replicas = [r for r in model.backends if r not in exclude] or list(model.backends)
        if len(replicas) == 1:
            return replicas[0]
        live = [r for r in replicas if r in backends and backends[r].available()]
        candidates = live or replicas
        floor = min(self.inflight.get(r, 0) for r in candidates)
        if adapter is not None:
            holders = [r for r in candidates if self._holds(r, model.name, adapter, backends)]
            roomy = [r for r in holders if self._has_room(r, floor, backends)]
            if roomy:
                return min(roomy, key=lambda r: self.inflight.get(r, 0))
        bound = {r: 0 for r in candidates}
        for (m, _), r in self.affinity.items():
            if m == model.name and r in bound:
                bound[r] += 1
        return min(candidates,
                   key=lambda r: (self.inflight.get(r, 0), bound[r], candidates.index(r)))

    def _holds(self, replica: str, model: str, adapter: str, backends: Mapping[str, Backend]) -> bool:
        if self.affinity.get((model, adapter)) == replica:
            return True
        backend = backends.get(replica)
        cap = backend.capacity() if backend is not None else None
        return cap is not None and adapter in cap.resident_adapters

    def _has_room(self, replica: str, floor: int, backends: Mapping[str, Backend]) -> bool:
        if self.inflight.get(replica, 0) >= floor + max(1, self.spill_inflight):
            return False
        backend = backends.get(replica)
        cap = backend.capacity() if backend is not None else None
        return cap is None or cap.kv_bytes_free > 0

    def snapshot(self) -> dict[str, object]:
        return {"inflight": dict(self.inflight),
                "affinity": {f"{m}:{a}": r for (m, a), r in self.affinity.items()}}


class RoutingEnv(Protocol):
    """What routing reads of its PolicyEnv (policies/chain.py, which holds the Router)."""

    router: Router
    backends: Mapping[str, Backend]

    def model(self, name: str) -> ModelConfig | None: ...

    def route(self, ctx: RequestContext, model_name: str) -> str: ...


class Routing:
    name = "routing"
    Config = RoutingConfig

    def __init__(self, env: RoutingEnv, cfg: RoutingConfig) -> None:
        self.env = env
        env.router.spill_inflight = cfg.spill_inflight

    async def apply(self, ctx: RequestContext) -> Decision:
        choice = self.env.route(ctx, ctx.target_model)
        model = self.env.model(ctx.target_model)
        if model is None or len(model.backends) == 1:
            return passed(self.name, "one replica")
        return modified(self.name, f"replica {choice}")

    async def on_backend_error(self, ctx: RequestContext, error: BackendError) -> Decision:
        """Another replica of the tier, in rotation, that has not failed this request."""
        model = self.env.model(ctx.target_model)
        if error.status < 500 or model is None:
            return passed(self.name)
        backends = self.env.backends
        spare = [b for b in model.backends if b not in ctx.failed_backends
                 and b in backends and backends[b].available()]
        if not spare:
            return passed(self.name, "no replica left")
        ctx.backend = spare[0]  # the chain's next routing pass picks among the spares
        return modified(self.name, f"replica: retried on another replica of {model.name}")

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.env.router.release(ctx)
