"""W3C trace context written for an upstream call: what the gateway's span is, as the
`traceparent` (and `tracestate`) headers the request's upstream calls carry."""

from __future__ import annotations

from opentelemetry.trace import Span


def trace_headers(span: Span) -> dict[str, str]:
    """`span`'s W3C traceparent (and tracestate), as the W3C propagator writes them, without
    its per-call lookups: what the request's upstream calls carry (RequestContext.trace_headers)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    headers = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    if ctx.trace_state:
        headers["tracestate"] = ctx.trace_state.to_header()
    return headers
