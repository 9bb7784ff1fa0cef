"""Shadow copies in-process: run from spare room only (dropped, never queued, when the
candidate's admission has waiters, its engine has a queue, or its KV pool is short), hold
no tenant's bytes, and are compared with the primary's answer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

from gateway.core.backend import BackendStats, Capacity
from gateway.core.context import Chunk, RequestContext, SamplingParams, Usage
from gateway.core.rollout_config import RolloutConfig
from gateway.metrics import GatewayMetrics
from gateway.rollout.compare import Answer
from gateway.rollout.manager import Live, Rollouts
from gateway.rollout.metrics import RolloutMetrics
from gateway.rollout.shadow import SHADOW_TENANT, ShadowRunner, shadow_context
from gateway.rollout.state import RolloutState
from policies.reservations import Reservations

BLOCK = 16
PER_TOKEN = 64


class Candidate:
    """A backend with a KV pool of `total` bytes that answers `text`, recording its calls."""

    name = "cand"

    def __init__(self, total: int, text: str = "hello world", waiting: int = 0) -> None:
        self.total = total
        self.text = text
        self.waiting = waiting
        self.calls: list[RequestContext] = []
        self.held_during: list[dict[str, int]] = []
        self.reservations: Reservations | None = None

    def capacity(self) -> Capacity:
        return Capacity(self.total, self.total, PER_TOKEN, BLOCK, 4096)

    def count_tokens(self, ctx: RequestContext) -> int:
        return 10

    def adapters(self) -> dict[str, int]:
        return {}

    def stats(self) -> BackendStats:
        return BackendStats(waiting=self.waiting)

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        self.calls.append(ctx)
        if self.reservations is not None:
            self.held_during.append(dict(self.reservations.pools["cand"].by_tenant))
        ctx.memory.kv_bytes_peak = 2048
        yield Chunk(text=self.text)
        yield Chunk(finish_reason="stop", usage=Usage(10, 2))


def setup(candidate: Candidate) -> tuple[Rollouts, ShadowRunner, Live, Reservations]:
    rollouts = Rollouts(RolloutMetrics(GatewayMetrics()), rng=random.Random(1))
    reservations = Reservations(lambda: 0.0)
    candidate.reservations = reservations
    state: Any = SimpleNamespace(
        backends={"cand": candidate}, policies=SimpleNamespace(reservations=reservations),
        telemetry=SimpleNamespace(record_spans=False, usage=SimpleNamespace(enabled=False)))
    cfg = RolloutConfig(candidate="cand", window_requests=100)
    live = Live("demo", "prim", cfg, RolloutState.start("demo", cfg))
    rollouts.live["demo"] = live
    return rollouts, ShadowRunner(rollouts, lambda: state), live, reservations


def request() -> RequestContext:
    return RequestContext(request_id="r1", tenant="acme", kind="chat", requested_model="demo",
                          target_model="demo", backend="prim",
                          sampling=SamplingParams(max_tokens=6, temperature=0.0),
                          messages=[{"role": "user", "content": "hi"}], rollout="primary",
                          priority="high")


def primary(text: str = "hello world") -> Answer:
    a = Answer(ttft=0.1, latency=0.2, kv_bytes=2048)
    a.add(Chunk(text=text))
    a.add(Chunk(finish_reason="stop"))
    return a


def outcomes(rollouts: Rollouts) -> dict[str, float]:
    return {o: rollouts.metrics.shadow.labels("demo", o)._value.get()
            for o in ("compared", "dropped", "error")}


def test_the_copy_is_low_priority_aimed_at_the_candidate_and_holds_nothing_yet() -> None:
    original = request()
    original.prompt_tokens = 10
    copy = shadow_context(original, "cand")
    assert (copy.backend, copy.shadow, copy.rollout, copy.priority) == ("cand", True, "shadow", "low")
    assert copy.prompt_tokens is None and copy.reservation is None and copy.decisions == []
    assert copy.memory is not original.memory and not original.shadow


def test_spare_room_compares_and_releases_a_reservation_of_no_tenant() -> None:
    cand = Candidate(total=1 << 20)
    rollouts, run, live, reservations = setup(cand)
    asyncio.run(run(live, request(), primary()))
    assert outcomes(rollouts) == {"compared": 1, "dropped": 0, "error": 0}
    assert len(cand.calls) == 1 and cand.calls[0].priority == "low"
    assert cand.held_during == [{SHADOW_TENANT: cand.calls[0].reservation.kv_bytes}]  # type: ignore[union-attr]
    assert reservations.pools["cand"].reserved == 0 and reservations.pools["cand"].by_tenant == {}
    assert live.report.pairs == 1 and live.report.exact == 1


def test_dropped_never_queued_when_admission_has_waiters_engine_queues_or_kv_is_short() -> None:
    # admission has a request queued on the candidate
    cand = Candidate(total=1 << 20)
    rollouts, run, live, reservations = setup(cand)
    reservations.pool("cand", 1 << 20).queued = 4096
    asyncio.run(run(live, request(), primary()))
    # the engine has a queue
    busy = Candidate(total=1 << 20, waiting=1)
    r2, run2, live2, _ = setup(busy)
    asyncio.run(run2(live2, request(), primary()))
    # the pool cannot hold the copy now (16 prompt+output tokens -> 1 KiB; 512 bytes left)
    short = Candidate(total=1 << 20)
    r3, run3, live3, res3 = setup(short)
    res3.pool("cand", 1 << 20).reserved = (1 << 20) - 512
    asyncio.run(run3(live3, request(), primary()))
    for rs, c in ((rollouts, cand), (r2, busy), (r3, short)):
        assert outcomes(rs) == {"compared": 0, "dropped": 1, "error": 0}
        assert c.calls == []
    assert live.report.pairs == live2.report.pairs == live3.report.pairs == 0


def test_a_disagreeing_candidate_scores_low() -> None:
    cand = Candidate(total=1 << 20, text="something else entirely")
    rollouts, run, live, _ = setup(cand)
    asyncio.run(run(live, request(), primary()))
    assert outcomes(rollouts)["compared"] == 1
    assert live.report.exact == 0 and live.report.agreement[0] < 0.5
    assert live.window.scores == live.report.agreement


def test_the_copy_has_its_own_span_and_usage_record_marked_shadow() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cand = Candidate(total=1 << 20)
    _, run, live, _ = setup(cand)
    emitted: list[dict[str, Any]] = []
    run.state = lambda: SimpleNamespace(
        backends={"cand": cand}, policies=SimpleNamespace(reservations=cand.reservations),
        telemetry=SimpleNamespace(record_spans=True, tracer=provider.get_tracer("t"),
                                  usage=SimpleNamespace(enabled=True, emit=emitted.append,
                                                        redact=lambda v, n: v)))
    asyncio.run(run(live, request(), primary()))
    (span,) = exporter.get_finished_spans()
    assert span.name == "shadow chat demo"
    assert span.attributes is not None and span.attributes["gateway.rollout"] == "shadow"
    assert span.attributes["gateway.shadow"] is True and span.attributes["gateway.backend"] == "cand"
    (record,) = emitted
    assert record["shadow"] is True and record["tenant"] == "acme" and record["backend"] == "cand"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (10, 2)
    assert "cost" not in record
