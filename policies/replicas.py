"""Replicas of one tier: which one serves a request (the `routing` policy's Router).

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.core.context import RequestContext
from gateway.settings import ModelConfig, RoutingConfig

if TYPE_CHECKING:
    from gateway.core.backend import Backend


class Router:
    def __init__(self, cfg: RoutingConfig) -> None:
        self.cfg = cfg
        self.inflight: dict[str, int] = {}
        self.affinity: dict[tuple[str, str], str] = {}  # (model, adapter) -> replica
        self._held: dict[int, str] = {}  # id(ctx) -> the replica it counts against

    def route(self, ctx: RequestContext, model: ModelConfig, backends: dict[str, Backend]) -> str:
        """Pick a replica of `model` for ctx, set ctx.backend and count it in flight."""
        self.release(ctx)
        choice = self.pick(ctx.adapter, model, backends)
        ctx.backend = choice
        self.inflight[choice] = self.inflight.get(choice, 0) + 1
        self._held[id(ctx)] = choice
        if ctx.adapter is not None and len(model.backends) > 1:
            self.affinity[(model.name, ctx.adapter)] = choice
        return choice

    def release(self, ctx: RequestContext) -> None:
        held = self._held.pop(id(ctx), None)
        if held is not None:
            self.inflight[held] -= 1

    def pick(self, adapter: str | None, model: ModelConfig, backends: dict[str, Backend]) -> str:
        replicas = model.backends
        if len(replicas) == 1:
            return replicas[0]
        live = [r for r in replicas if r in backends and backends[r].available()]
        candidates = live or list(replicas)
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

    def _holds(self, replica: str, model: str, adapter: str, backends: dict[str, Backend]) -> bool:
        if self.affinity.get((model, adapter)) == replica:
            return True
        backend = backends.get(replica)
        cap = backend.capacity() if backend is not None else None
        return cap is not None and adapter in cap.resident_adapters

    def _has_room(self, replica: str, floor: int, backends: dict[str, Backend]) -> bool:
        if self.inflight.get(replica, 0) >= floor + max(1, self.cfg.spill_inflight):
            return False
        backend = backends.get(replica)
        cap = backend.capacity() if backend is not None else None
        return cap is None or cap.kv_bytes_free > 0

    def snapshot(self) -> dict[str, object]:
        return {"inflight": dict(self.inflight),
                "affinity": {f"{m}:{a}": r for (m, a), r in self.affinity.items()}}
