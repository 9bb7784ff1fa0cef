"""One call to an upstream, seen as an OpenTelemetry client span (GenAI conventions).

Each try of a request to an upstream (the first and every retry) is its own CLIENT span,
a child of the gateway's request span, named `chat MODEL` / `text_completion MODEL`, with
`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`, `server.address`,
`server.port`, `http.request.resend_count` (retries only), `http.response.status_code`,
`error.type` on failure and, for the try that answered, the usage it reported. The upstream
gets that span's own traceparent, so its spans hang under the try that reached it.

Spans are made only while the app records them (`RequestContext.tracer` is set); otherwise
every method here is a no-op and the upstream gets the request span's trace context.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry.trace import Span, SpanKind, StatusCode

from gateway.core.context import RequestContext, Usage
from gateway.core.trace import trace_headers

OPERATION = {"chat": "chat", "completion": "text_completion"}


def server_of(url: str) -> tuple[str, int]:
    """(server.address, server.port) of an upstream's base URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


class UpstreamCall:
    """The span of one try; `span` None: nothing is recorded."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    @classmethod
    def start(cls, ctx: RequestContext, provider: str, model: str, server: tuple[str, int],
              attempt: int) -> UpstreamCall:
        tracer = ctx.tracer
        if tracer is None:
            return NOT_TRACED
        operation = OPERATION.get(ctx.kind, ctx.kind)
        attrs: dict[str, str | int] = {
            "gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
            "gen_ai.request.model": model, "server.address": server[0], "server.port": server[1]}
        if attempt:
            attrs["http.request.resend_count"] = attempt
        return cls(tracer.start_span(f"{operation} {model}", kind=SpanKind.CLIENT,
                                     attributes=attrs))

    def headers(self, ctx: RequestContext) -> dict[str, str]:
        """The trace context this try sends upstream."""
        return trace_headers(self.span) if self.span is not None else ctx.trace_headers

    def answered(self, status: int) -> None:
        if self.span is not None:
            self.span.set_attribute("http.response.status_code", status)

    def failed(self, error_type: str) -> None:
        """The try failed (an exception's class name or a status code): the span ends."""
        if self.span is not None:
            self.span.set_attribute("error.type", error_type)
            self.span.set_status(StatusCode.ERROR)
            self.span.end()

    def finished(self, usage: Usage | None, finish_reason: str | None) -> None:
        """The answer ended (or was cut short by the caller): the span ends."""
        span = self.span
        if span is None or not span.is_recording():
            return
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        if finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        span.end()


NOT_TRACED = UpstreamCall(None)
