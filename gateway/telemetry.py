"""One app's telemetry: the request record the generation handler opens and closes, and the
hooks the pipeline calls with it (begin, generating, chunk, backend_failed). Metrics, spans
and the in-flight table are all fed from here, once per request, when the last response byte
has gone. The record is passed explicitly; only OpenTelemetry's own context makes the
request's span current (policy spans are its children)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, TracerProvider

from gateway.core.backend import Backend
from gateway.core.context import Chunk, Decision, RequestContext
from gateway.core.policy import Outcome, Policy
from gateway.core.procmem import GpuProbe
from gateway.core.trace import trace_headers
from gateway.memory_collector import MemoryCollector, MultiprocessPublisher
from gateway.metrics import NONE, GatewayMetrics, RequestObservation, multiprocess_dir
from gateway.settings import Settings
from gateway.sse import response_id
from gateway.tracing import (
    OPERATION,
    TraceContext,
    build_logger_provider,
    passthrough_span,
    request_attributes,
    set_usage,
)
from gateway.usage import UsageLog, UsageSinks, usage_record, worker_path
from policies.chain import PolicyChain

log = logging.getLogger("gateway.telemetry")

@dataclass(slots=True)
class RequestRecord:
    """Timings of one generation request (monotonic seconds) and its span."""

    span: Span
    request_id: str = ""
    start: float = field(default_factory=time.monotonic)
    start_ns: int = field(default_factory=time.time_ns)
    ctx: RequestContext | None = None
    status: int = 500
    generate_start: float | None = None
    first_chunk: float | None = None
    generate_end: float | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    batch_size: int | None = None
    otel_token: object = None  # while open: OpenTelemetry's context token

    def ns(self, t: float) -> int:
        return self.start_ns + int((t - self.start) * 1e9)


class Telemetry:
    def __init__(self, settings: Settings, backends: Mapping[str, Backend],
                 tracer_provider: TracerProvider, record_spans: bool = True,
                 logger_provider: Any = None) -> None:
        """`record_spans` False (no exporter configured): no spans are built; requests carry
        a pass-through span context so trace context still reaches upstreams.
        `logger_provider`: an OpenTelemetry SDK LoggerProvider for usage records (tests);
        by default one is built when `telemetry.otlp_usage_logs` and an endpoint are set."""
        self.backends = backends
        self.record_spans = record_spans
        self.metrics = GatewayMetrics()
        self.worker = os.getpid()
        self._owned_logs = None
        if logger_provider is None and settings.telemetry.otlp_usage_logs:
            logger_provider = self._owned_logs = build_logger_provider(settings.telemetry)
        otlp = logger_provider.get_logger("gateway.usage") if logger_provider is not None else None
        self.usage = UsageSinks(self._usage_log(settings), otlp)
        self._configure(settings)
        self.tracer = tracer_provider.get_tracer("gateway")
        self.trace_context = TraceContext()
        self._in_flight: dict[int, RequestRecord] = {}
        self.gpu = GpuProbe()
        self.collector = MemoryCollector(
            backends, [t.name for t in settings.tenants], self.in_flight, self.gpu)
        self.publisher: MultiprocessPublisher | None = None
        if self.metrics.multiprocess:
            self.publisher = MultiprocessPublisher(self.collector, multiprocess_dir())
        else:
            self.metrics.registry.register(self.collector)
        self._publish_task: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def _usage_log(self, settings: Settings) -> UsageLog | None:
        server = settings.server
        if server.usage_log is None:
            return None
        path = worker_path(server.usage_log, self.metrics.multiprocess, self.worker)
        return UsageLog(path, server.usage_log_max_bytes, server.usage_log_backups)

    def _configure(self, settings: Settings) -> None:
        """What telemetry reads of the config: prices (usage records' cost), and which
        backends call an upstream (their `provider`: GenAI client metrics)."""
        self.prices = {m.name: m.price for m in settings.models if m.price is not None}
        self.providers: dict[str, str] = {
            name: provider for name, b in self.backends.items()
            if isinstance(provider := getattr(b, "provider", None), str)}

    async def reconfigure(self, settings: Settings, backends: Mapping[str, Backend],
                          is_key: Callable[[str], bool]) -> None:
        """A config reload: the new backends, tenants, prices, usage log file and keys."""
        self.backends = self.collector.backends = backends
        self.collector.tenants = tuple(t.name for t in settings.tenants)
        self._configure(settings)
        self.usage.is_key = is_key
        new = self._usage_log(settings)
        old = self.usage.file
        if (new is None) != (old is None) or (new is not None and old is not None and (
                new.path, new.max_bytes, new.backups) != (old.path, old.max_bytes, old.backups)):
            if old is not None:
                await old.aclose()
            self.usage.file = new
            if new is not None:
                new.start()

    async def start(self) -> None:
        self.usage.start()
        if self.publisher is not None:
            self._publish_task = asyncio.create_task(self._publish_loop(self.publisher))

    async def _publish_loop(self, publisher: MultiprocessPublisher) -> None:
        while True:
            try:
                publisher.publish()
            except Exception:
                log.exception("publishing memory metrics failed")
            await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        await self.usage.aclose()
        if self._owned_logs is not None:
            self._owned_logs.shutdown()
        if self._publish_task is not None:
            self._publish_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publish_task
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        self.gpu.close()

    def attach_policies(self, chain: PolicyChain) -> None:
        """Trace each policy's apply() as a child span; read the bytes admission reserved."""
        if self.record_spans:
            chain.policies = tuple(TracedPolicy(p, self.tracer) for p in chain.policies)
        if chain.get("admission") is not None:
            self.collector.reservations = chain.reservations.reserved_by_tenant
        if chain.quotas is not None:  # shared_state configured
            self.collector.shared_state = chain.quotas.stats

    # ---- reads --------------------------------------------------------------------------

    def in_flight(self) -> list[RequestContext]:
        return [r.ctx for r in list(self._in_flight.values()) if r.ctx is not None]

    def in_flight_records(self) -> list[RequestRecord]:
        return [r for r in list(self._in_flight.values()) if r.ctx is not None]

    def scrape(self) -> bytes:
        if self.publisher is not None:
            self.publisher.publish()
        return self.metrics.exposition()

    # ---- hooks for the pipeline ---------------------------------------------------------

    def begin(self, rec: RequestRecord, ctx: RequestContext) -> None:
        """The request's context is known: label its metrics and list it as in flight; its
        upstream calls carry the request span's trace context."""
        rec.ctx = ctx
        ctx.trace_headers = trace_headers(rec.span)
        if self.record_spans:
            ctx.tracer = self.tracer  # backends' upstream calls become client spans

    def generating(self, rec: RequestRecord) -> None:
        """The policies are done and the backend is about to be called."""
        rec.generate_start = time.monotonic()

    def chunk(self, rec: RequestRecord, ctx: RequestContext, chunk: Chunk) -> None:
        """Called for every backend chunk: times the first and the last."""
        if rec.first_chunk is None:
            rec.first_chunk = time.monotonic()
            backend = self.backends.get(ctx.backend)
            rec.batch_size = backend.stats().running if backend is not None else None
        if chunk.usage is not None:
            rec.prompt_tokens = chunk.usage.prompt_tokens
            rec.completion_tokens = chunk.usage.completion_tokens
        if chunk.finish_reason is not None:
            rec.finish_reason = chunk.finish_reason
            rec.generate_end = time.monotonic()

    def backend_failed(self, rec: RequestRecord, ctx: RequestContext, code: str | None) -> None:
        """A backend raised: count it by backend, code and whether a chunk had gone out."""
        phase = "mid_stream" if rec.first_chunk is not None else "before_first_byte"
        self.metrics.backend_errors.labels(ctx.backend, code or "backend_error", phase).inc()

    # ---- the request lifecycle (called by the generation handler) ------------------------

    def open(self, kind: str, method: str, path: str, headers: Mapping[str, str],
             request_id: str = "") -> RequestRecord:
        """A request's record, in flight, with its span (a child of the client's traceparent)
        current in OpenTelemetry's context until close(); called in the request's task."""
        parent = self.trace_context.extract(headers)
        if self.record_spans:
            span = self.tracer.start_span(
                OPERATION[kind], context=parent, kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "http.route": path,
                            "gen_ai.operation.name": OPERATION[kind]})
        else:
            span = passthrough_span(parent)
        rec = RequestRecord(span=span, request_id=request_id)
        self._in_flight[id(rec)] = rec
        rec.otel_token = otel_context.attach(trace.set_span_in_context(span))
        return rec

    def close(self, rec: RequestRecord) -> None:
        """After the last byte: undo open()'s context, then the request's metrics and spans."""
        if rec.otel_token is not None:
            otel_context.detach(rec.otel_token)  # type: ignore[arg-type]
            rec.otel_token = None
        self._in_flight.pop(id(rec), None)
        end = time.monotonic()
        ctx = rec.ctx
        try:
            obs = self._observation(rec, end)
            self.metrics.observe(obs)
            if self.usage.enabled:
                self.usage.emit(usage_record(obs, ctx, rec.request_id, self.worker,
                                             self.prices.get(ctx.target_model) if ctx else None,
                                             self.usage))
        except Exception:
            log.exception("recording request metrics failed")
        if not self.record_spans:
            return
        span = rec.span
        span.set_attribute("http.response.status_code", rec.status)
        if rec.status >= 400:
            span.set_attribute("error.type", str(rec.status))
        if rec.status >= 500:
            span.set_status(StatusCode.ERROR)
        if ctx is not None:
            span.update_name(f"{OPERATION.get(ctx.kind, ctx.kind)} {ctx.requested_model}")
            span.set_attributes(request_attributes(ctx))
            set_usage(span, rec.prompt_tokens or ctx.prompt_tokens, rec.completion_tokens,
                      rec.finish_reason)
            if rec.status < 400:
                span.set_attribute("gen_ai.response.id", response_id(ctx))
            self._phase_spans(rec, ctx, end)
        span.end(end_time=rec.ns(end))

    def _phase_spans(self, rec: RequestRecord, ctx: RequestContext, end: float) -> None:
        """queue, prefill (until the first chunk) and decode (after it), from the timings."""
        if rec.generate_start is None:
            return
        parent = trace.set_span_in_context(rec.span)
        first = rec.first_chunk if rec.first_chunk is not None else end
        queued = min(rec.generate_start + ctx.memory.queue_seconds, first)
        last = rec.generate_end if rec.generate_end is not None else end
        phases = (("queue", rec.generate_start, queued), ("prefill", queued, first),
                  ("decode", first, last))
        for name, t0, t1 in phases:
            if name == "decode" and rec.first_chunk is None:
                continue
            child = self.tracer.start_span(name, context=parent, start_time=rec.ns(t0),
                                           attributes={"gateway.phase": name})
            if name == "queue":
                child.set_attribute("gateway.memory.kv_bytes_reserved",
                                    ctx.memory.kv_bytes_reserved)
            if name == "decode" and rec.completion_tokens is not None:
                child.set_attribute("gen_ai.usage.output_tokens", rec.completion_tokens)
            child.end(end_time=rec.ns(t1))

    def _observation(self, rec: RequestRecord, end: float) -> RequestObservation:
        ctx = rec.ctx
        if ctx is None:
            return RequestObservation(NONE, NONE, NONE, str(rec.status), end - rec.start)
        decode = None
        if rec.first_chunk is not None and rec.generate_end is not None:
            decode = rec.generate_end - rec.first_chunk
        completion = rec.completion_tokens or 0
        prompt = rec.prompt_tokens or ctx.prompt_tokens or 0
        ok = rec.status < 400
        provider = self.providers.get(ctx.backend)
        upstream = None
        if provider is not None and rec.generate_start is not None:
            upstream = (rec.generate_end or end) - rec.generate_start
        return RequestObservation(
            tenant=ctx.tenant,
            model=ctx.requested_model,
            backend=ctx.backend,
            status=str(rec.status),
            duration=end - rec.start,
            ttft=rec.first_chunk - rec.start if rec.first_chunk is not None else None,
            tokens_per_second=completion / decode if decode and completion > 1 else None,
            prompt_tokens=prompt if ok else 0,
            completion_tokens=completion,
            gateway_queue_seconds=ctx.queue_seconds if rec.generate_start else None,
            backend_queue_seconds=ctx.memory.queue_seconds if rec.generate_start else None,
            kv_bytes_reserved=ctx.memory.kv_bytes_reserved,
            kv_bytes_peak=ctx.memory.kv_bytes_peak,
            context_tokens=prompt + completion if ok else 0,
            batch_size=rec.batch_size,
            estimate_error_tokens=(completion - ctx.expected_tokens * ctx.sampling.n
                                   if ok and ctx.expected_tokens is not None else None),
            decisions=[(d.policy, d.action) for d in ctx.decisions],
            operation=OPERATION.get(ctx.kind, ctx.kind),
            response_model=ctx.target_model,
            provider=provider,
            upstream_seconds=upstream,
            time_per_output_token=decode / (completion - 1) if decode and completion > 1 else None,
        )

class TracedPolicy:
    """A policy seen through a span: `policy NAME`, with its decision's action and reason."""

    def __init__(self, policy: Policy, tracer: Tracer) -> None:
        self.policy = policy
        self.name = policy.name
        self._tracer = tracer

    async def apply(self, ctx: RequestContext) -> Decision:
        # No exception message in the span: a reject's message echoes client input (a model or
        # adapter name, where a careless client may paste a key). Its type and status go in.
        with self._tracer.start_as_current_span(
            f"policy {self.name}", attributes={"gateway.policy": self.name},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                decision = await self.policy.apply(ctx)
            except Exception as e:
                span.set_attributes({"gateway.policy.action": "reject",
                                     "error.type": str(getattr(e, "status", type(e).__name__))})
                raise
            span.set_attribute("gateway.policy.action", decision.action)
            if decision.reason:
                span.set_attribute("gateway.policy.reason", decision.reason)
            return decision

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        await self.policy.on_finish(ctx, outcome)

    def __getattr__(self, name: str) -> Any:  # the policy's own attributes, for chain.get()
        return getattr(self.policy, name)
