"""Without an exporter no span is built, yet the upstream still gets the client's trace id
under a span id of the gateway's own (gateway/tracing.passthrough_span)."""

from __future__ import annotations

import asyncio

from gateway.app import create_app
from gateway.settings import parse_settings
from tests.gateway.test_tracing import (  # noqa: F401  (upstream is a fixture)
    CLIENT_SPAN,
    TRACE_ID,
    TRACEPARENT,
    drive,
    upstream,
)
from tests.server import ACME_SHA


def config(url: str) -> dict[str, object]:
    return {
        "backends": {"up": {"kind": "openai", "url": url}},
        "models": [{"name": "remote", "backend": "up"}],
        "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["remote"]}],
    }


def test_no_exporter_builds_no_spans_but_propagates_the_trace(
    upstream: tuple[str, list[dict[str, str]]],  # noqa: F811
) -> None:
    url, seen = upstream
    app = create_app(parse_settings(config(url)))  # no provider injected, no otlp_endpoint
    telemetry = app.state.gateway.telemetry
    assert telemetry.record_spans is False
    assert all(type(p).__name__ != "TracedPolicy" for p in app.state.gateway.policies.policies)
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    lines = asyncio.run(drive(app, body, {"authorization": "Bearer sk-demo-acme",
                                          "traceparent": TRACEPARENT}))
    assert lines[-1] == "data: [DONE]"
    lines = asyncio.run(drive(app, body, {"authorization": "Bearer sk-demo-acme"}))
    assert lines[-1] == "data: [DONE]"
    assert len(seen) == 2
    version, trace_id, span_id, flags = seen[0]["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != CLIENT_SPAN and int(span_id, 16) != 0  # the gateway's own span id
    _, fresh_trace, fresh_span, _ = seen[1]["traceparent"].split("-")
    assert fresh_trace != TRACE_ID and int(fresh_trace, 16) != 0 and int(fresh_span, 16) != 0
    assert telemetry.in_flight() == []  # records are closed as before
