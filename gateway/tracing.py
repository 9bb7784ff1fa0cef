"""OpenTelemetry tracing: the TracerProvider an app owns, W3C trace context in and out, and the
span attributes of one request (GenAI semantic conventions, memory under gateway.memory.*)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.core.context import RequestContext
from gateway.settings import TelemetryConfig

OPERATION = {"chat": "chat", "completion": "text_completion"}


def build_tracer_provider(cfg: TelemetryConfig) -> TracerProvider:
    """A provider exporting OTLP over HTTP when `telemetry.otlp_endpoint` is set; without an
    endpoint spans are created (so trace context still flows to upstreams) but not exported."""
    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    if cfg.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=_otlp_endpoint(cfg, "traces"))))
    return provider


def _otlp_endpoint(cfg: TelemetryConfig, signal: str) -> str:
    endpoint = (cfg.otlp_endpoint or "").rstrip("/")
    return endpoint if endpoint.endswith(f"/v1/{signal}") else f"{endpoint}/v1/{signal}"


def build_logger_provider(cfg: TelemetryConfig) -> Any:
    """`telemetry.otlp_usage_logs`: a LoggerProvider exporting usage records as OTLP log
    records to the same endpoint's /v1/logs (None without an endpoint)."""
    if not cfg.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    provider = LoggerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=_otlp_endpoint(cfg, "logs"))))
    return provider


class TraceContext:
    """W3C traceparent/tracestate read from client headers (inject_current writes them to
    upstream requests)."""

    def __init__(self) -> None:
        self._propagator = TraceContextTextMapPropagator()

    def extract(self, headers: Mapping[str, str]) -> Context:
        return self._propagator.extract(headers)


def passthrough_span(parent: Context) -> Span:
    """Without an exporter: no span is recorded, but the request still gets a span context of
    its own (the client's trace id, or a new one; a fresh span id), so the traceparent sent to
    upstreams is the same as when recording, at a fraction of the cost."""
    incoming = trace.get_current_span(parent).get_span_context()
    valid = incoming.is_valid
    return NonRecordingSpan(SpanContext(
        trace_id=incoming.trace_id if valid else random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=incoming.trace_flags if valid else TraceFlags(TraceFlags.SAMPLED),
        trace_state=incoming.trace_state if valid else None,
    ))


def request_attributes(ctx: RequestContext) -> dict[str, Any]:
    """GenAI request/response attributes plus the request's memory, for the request span."""
    s = ctx.sampling
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION.get(ctx.kind, ctx.kind),
        "gen_ai.provider.name": "memgate",  # the server span: this gateway serves the model
        "gen_ai.request.model": ctx.requested_model,
        "gen_ai.response.model": ctx.target_model,
        "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p,
        "gen_ai.request.presence_penalty": s.presence_penalty,
        "gen_ai.request.frequency_penalty": s.frequency_penalty,
        "gateway.tenant": ctx.tenant,
        "gateway.backend": ctx.backend,
        "gateway.stream": ctx.stream,
    }
    if ctx.rollout is not None:  # the rollout side that served it (gateway/rollout/)
        attrs["gateway.rollout"] = ctx.rollout
    if s.max_tokens is not None:  # None: the client named no limit
        attrs["gen_ai.request.max_tokens"] = s.max_tokens
    if s.seed is not None:
        attrs["gen_ai.request.seed"] = s.seed
    if s.stop:
        attrs["gen_ai.request.stop_sequences"] = list(s.stop)
    for f in dataclasses.fields(ctx.memory):  # every RequestMemory field, as it grows
        value = getattr(ctx.memory, f.name)
        if value is not None:
            attrs[f"gateway.memory.{f.name}"] = value
    return attrs


def set_usage(span: Span, prompt_tokens: int | None, completion_tokens: int | None,
              finish_reason: str | None) -> None:
    if prompt_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
    if completion_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
    if finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
