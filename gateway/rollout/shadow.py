"""A shadow copy: the request a primary just answered, sent again to the rollout's candidate,
detached from the client (it starts after the client's answer went out and nothing of it
reaches the client), from spare capacity only, and compared with the primary's answer.

Spare capacity: the copy holds KV bytes in the candidate's pool like any request, but never
waits for them: when the candidate's admission has requests queued, its engine has requests
waiting, or the pool cannot hold the copy now, the copy is dropped and counted. It runs at
the lowest priority (its engine preempts it first), outside the policy chain: no rate limit,
token quota, budget or tenant usage sees it. Its usage record is written apart (`shadow:
true`) and its span is marked `gateway.rollout: shadow`."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import SpanKind

from gateway.core.context import Decision, RequestContext, RequestMemory, Reservation
from gateway.core.errors import GatewayError
from gateway.rollout.compare import Answer, compare
from gateway.rollout.manager import Live, Rollouts
from gateway.state import GatewayState
from gateway.tracing import OPERATION
from policies.demand import demand

log = logging.getLogger("gateway.rollout")

SHADOW_TENANT = "(shadow)"  # whose bytes a copy holds in the pool: no tenant's
MAX_SHADOWS = 8  # copies in flight per rollout; past it a copy is dropped


def shadow_context(ctx: RequestContext, candidate: str) -> RequestContext:
    """The copy: the primary's request as the policies left it (adapter, trimmed messages),
    aimed at the candidate, at the lowest priority, holding nothing yet."""
    return dataclasses.replace(
        ctx, backend=candidate, shadow=True, rollout="shadow", rollout_backend=candidate,
        priority="low", decisions=[], memory=RequestMemory(), failed_backends=[],
        reservation=None, usage=None, prompt_tokens=None, tokenized=None,
        expected_tokens=None, precharged_tokens=None, queue_seconds=0.0, tracer=None,
        trace_headers={}, created=time.time())


class ShadowRunner:
    def __init__(self, rollouts: Rollouts, state: Callable[[], GatewayState]) -> None:
        self.rollouts = rollouts
        self.state = state

    async def __call__(self, live: Live, ctx: RequestContext, primary: Answer) -> None:
        model = live.model
        metrics = self.rollouts.metrics
        if live.shadows_in_flight >= MAX_SHADOWS:
            metrics.shadow.labels(model, "dropped").inc()
            return
        live.shadows_in_flight += 1
        try:
            outcome = await self._run(live, shadow_context(ctx, live.cfg.candidate), primary)
        finally:
            live.shadows_in_flight -= 1
        metrics.shadow.labels(model, outcome).inc()

    async def _run(self, live: Live, sctx: RequestContext, primary: Answer) -> str:
        state = self.state()
        backend = state.backends.get(live.cfg.candidate)
        if backend is None:
            return "error"
        reservations = state.policies.reservations
        try:
            need = await demand(backend, sctx)
        except GatewayError:
            return "error"
        cap = backend.capacity()
        pool = reservations.pool(backend.name, need.budget,
                                 cap.lanes.long_cap(cap.kv_bytes_total)
                                 if cap is not None and cap.lanes is not None else None)
        waiting = backend.stats().waiting
        if pool.queued > 0 or (waiting or 0) > 0 or not pool.fits(need.kv_bytes, need.long):
            return "dropped"  # never queued: the candidate has no spare room now
        res = Reservation(backend.name, SHADOW_TENANT, need.kv_bytes, need.tokens, sctx.adapter,
                          long=need.long)
        reservations.reserve(res)
        sctx.reservation = res
        sctx.decisions.append(Decision("rollout", "modify", "shadow copy"))
        answer = Answer()
        start = time.monotonic()
        span = self._span(state, sctx)
        try:
            async for chunk in backend.generate(sctx):
                if answer.ttft is None:
                    answer.ttft = time.monotonic() - start
                answer.add(chunk)
                if chunk.finish_reason is not None and chunk.usage is not None:
                    sctx.usage = chunk.usage
        except GatewayError as exc:
            answer.error = exc.code or str(exc.status)
        finally:
            reservations.release(res)
        answer.latency = time.monotonic() - start
        answer.kv_bytes = sctx.memory.kv_bytes_peak
        greedy = sctx.sampling.temperature == 0
        comparison = compare(primary, answer, sctx.body, greedy)
        self.rollouts.compared(live, comparison, primary, answer)
        self._record(state, sctx, answer, span)
        return "error" if answer.error is not None else "compared"

    def _span(self, state: GatewayState, sctx: RequestContext) -> Any:
        telemetry = state.telemetry
        if not telemetry.record_spans:
            return None
        return telemetry.tracer.start_span(
            f"shadow {OPERATION.get(sctx.kind, sctx.kind)} {sctx.requested_model}",
            kind=SpanKind.INTERNAL,
            attributes={"gateway.rollout": "shadow", "gateway.shadow": True,
                        "gateway.backend": sctx.backend, "gen_ai.request.model": sctx.requested_model})

    def _record(self, state: GatewayState, sctx: RequestContext, answer: Answer, span: Any) -> None:
        """The copy's usage record, apart (`shadow: true`): never summed into a tenant's."""
        usage = sctx.usage
        if span is not None:
            span.set_attribute("gateway.memory.kv_bytes_peak", sctx.memory.kv_bytes_peak)
            if answer.error is not None:
                span.set_attribute("error.type", answer.error)
            span.end()
        sinks = state.telemetry.usage
        if not sinks.enabled:
            return
        sinks.emit({
            "time": round(time.time(), 6), "shadow": True, "rollout": "shadow",
            "request_id": sinks.redact(sctx.request_id, 128), "tenant": sctx.tenant,
            "model": sctx.requested_model, "backend": sctx.backend,
            "status": 200 if answer.error is None else 500,
            "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
            "completion_tokens": usage.completion_tokens if usage is not None else 0,
            "kv_bytes_reserved": sctx.memory.kv_bytes_reserved,
            "kv_bytes_peak": sctx.memory.kv_bytes_peak,
            "ttft_s": None if answer.ttft is None else round(answer.ttft, 6),
            "duration_s": None if answer.latency is None else round(answer.latency, 6),
        })
