"""Spans of a streaming request (in-process app, in-memory exporter), and the W3C traceparent
reaching an openai-kind upstream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_app
from gateway.settings import parse_settings
from tests.server import ACME_SHA, demo_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
POLICIES = ["adapter_selection", "context_trim", "degrade", "admission"]


def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, exporter


async def drive(app: Any, request: dict[str, Any], headers: dict[str, str]) -> list[str]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://gw") as client,
            client.stream("POST", "/v1/chat/completions", json=request, headers=headers,
                          timeout=60) as r,
        ):
            assert r.status_code == 200, await r.aread()
            return [line async for line in r.aiter_lines() if line.startswith("data:")]


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def test_streaming_request_spans(demo_model: Path) -> None:
    tp, exporter = provider()
    cfg = {**demo_config(demo_model), "policies": POLICIES}
    app = create_app(parse_settings(cfg), tracer_provider=tp)
    body = {"model": "demo", "messages": [{"role": "user", "content": "Where is my refund?"}],
            "max_tokens": 12, "temperature": 0.5, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = asyncio.run(drive(app, body, {"authorization": "Bearer sk-demo-acme",
                                          "traceparent": TRACEPARENT}))
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
    spans = by_name(exporter.get_finished_spans())
    assert {"chat demo", "queue", "prefill", "decode"} <= set(spans)
    root = spans["chat demo"]
    # the request span continues the client's trace, and is the parent of every phase
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
    policy_spans = [f"policy {p}" for p in POLICIES]
    for name in ("queue", "prefill", "decode", *policy_spans):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    assert spans["queue"].end_time <= spans["prefill"].end_time <= spans["decode"].start_time
    # policies run in order, before the backend is called
    starts = [spans[n].start_time for n in policy_spans]
    assert starts == sorted(starts) and spans[policy_spans[-1]].end_time <= spans["queue"].start_time
    assert spans["policy admission"].attributes["gateway.policy.action"] in ("pass", "modify")
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "demo" and a["gen_ai.response.model"] == "demo"
    assert a["gen_ai.request.max_tokens"] == 12
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["http.response.status_code"] == 200
    assert a["gateway.tenant"] == "acme"
    # memory: block-exact KV for prompt + max_tokens, the adapter it pinned and its bytes
    assert a["gateway.memory.kv_bytes_reserved"] > 0
    assert 0 < a["gateway.memory.kv_bytes_peak"] <= a["gateway.memory.kv_bytes_reserved"]
    assert a["gateway.memory.adapter"] == "acme-support"
    assert a["gateway.memory.adapter_bytes"] > 0
    # no secret in any span
    for span in exporter.get_finished_spans():
        assert "sk-demo-acme" not in json.dumps(dict(span.attributes or {}), default=str)


def test_completion_span_name_and_rejected_request(demo_model: Path) -> None:
    tp, exporter = provider()
    app = create_app(parse_settings(demo_config(demo_model)), tracer_provider=tp)

    async def go() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                ok = await c.post("/v1/completions", headers={"authorization": "Bearer sk-demo-acme"},
                                  json={"model": "demo", "prompt": "Hello", "max_tokens": 4})
                bad = await c.post("/v1/completions", headers={"authorization": "Bearer sk-nope"},
                                   json={"model": "demo", "prompt": "Hello"})
                return ok.status_code, bad.status_code

    assert asyncio.run(go()) == (200, 401)
    spans = by_name(exporter.get_finished_spans())
    assert spans["text_completion demo"].attributes["gen_ai.operation.name"] == "text_completion"
    rejected = spans["text_completion"]  # no model known before authentication
    assert rejected.attributes["http.response.status_code"] == 401
    assert rejected.attributes["error.type"] == "401"
    assert "sk-nope" not in json.dumps(dict(rejected.attributes), default=str)


# ---------------------------------------------------------------- propagation to upstreams


class _Upstream(BaseHTTPRequestHandler):
    seen: list[dict[str, str]]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        events = [
            {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
        ]
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        body += b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []
    handler = type("Recorder", (_Upstream,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_traceparent_reaches_openai_upstream(upstream: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = upstream
    cfg = {
        "backends": {"up": {"kind": "openai", "url": url}},
        "models": [{"name": "remote", "backend": "up"}],
        "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["remote"]}],
    }
    tp, exporter = provider()
    app = create_app(parse_settings(cfg), tracer_provider=tp)
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    lines = asyncio.run(drive(app, body, {"authorization": "Bearer sk-demo-acme",
                                          "traceparent": TRACEPARENT}))
    assert lines[-1] == "data: [DONE]"
    assert len(seen) == 1
    version, trace_id, parent_id, _flags = seen[0]["traceparent"].split("-")
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)  # the upstream call
    assert server.name == client.name == "chat remote"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert version == "00" and trace_id == TRACE_ID
    # the upstream's parent is the gateway's client span for this call, not the client's span
    assert parent_id == format(client.context.span_id, "016x")
    assert client.attributes["gen_ai.provider.name"] == "openai"
    assert client.attributes["gen_ai.usage.output_tokens"] == 1
    assert client.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.provider.name"] == "memgate"
    assert server.attributes["gen_ai.response.id"].startswith("chatcmpl-")
    assert "gen_ai.system" not in server.attributes  # deprecated
    assert "sk-demo-acme" not in json.dumps(seen[0])  # the client's key never goes upstream


@pytest.mark.parametrize("state", [None, "vendor=abc,other=1"])
def test_trace_headers_are_what_the_w3c_propagator_writes(state: str | None) -> None:
    from opentelemetry import context, trace
    from opentelemetry.trace import (
        INVALID_SPAN,
        NonRecordingSpan,
        SpanContext,
        TraceFlags,
        TraceState,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from gateway.core.trace import trace_headers

    assert trace_headers(INVALID_SPAN) == {}  # no span context: nothing to write
    span = NonRecordingSpan(SpanContext(
        trace_id=int(TRACE_ID, 16), span_id=int(CLIENT_SPAN, 16), is_remote=False,
        trace_flags=TraceFlags(1), trace_state=TraceState.from_header([state]) if state else None))
    token = context.attach(trace.set_span_in_context(span))
    try:
        ours = trace_headers(span)
        theirs: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(theirs)
    finally:
        context.detach(token)
    assert ours == theirs and ours["traceparent"] == TRACEPARENT
