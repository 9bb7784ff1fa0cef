"""The conventions: standard process_/python_ collectors on the app's registry,
OpenTelemetry GenAI metrics, each upstream's rotation, retries and failures, and a client
span per try of an upstream call (a retry is its own span, with its resend count)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_app
from gateway.settings import parse_settings
from tests.gateway.upstream import Upstream
from tests.server import free_port, metric

KEY = "sk-conventions"


def config(url: str) -> dict[str, Any]:
    return {
        "backends": {"up": {"kind": "openai", "url": url},
                     "gone": {"kind": "openai", "url": f"http://127.0.0.1:{free_port()}/v1",
                              "retries": 1, "retry_backoff_s": 0.001, "cooldown_s": 300}},
        "models": [{"name": "m", "backend": "up"}, {"name": "far", "backend": "gone"}],
        "tenants": [{"name": "acme", "models": ["m", "far"],
                     "api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}],
    }


def test_metrics_and_client_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def go() -> str:
        async with Upstream() as up:
            app = create_app(parse_settings(config(up.url)), tracer_provider=provider)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                    auth = {"authorization": f"Bearer {KEY}"}
                    msgs = [{"role": "user", "content": "hi"}]
                    ok = await c.post("/v1/chat/completions", headers=auth,
                                      json={"model": "m", "messages": msgs})
                    far = await c.post("/v1/chat/completions", headers=auth,
                                       json={"model": "far", "messages": msgs})
                    assert (ok.status_code, far.status_code) == (200, 502)
                    return (await c.get("/metrics")).text

    text = asyncio.run(go())
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "python_gc_collections_total"):
        assert metric(text, name) > 0, name
    assert 'python_info{implementation="CPython"' in text
    server = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "m",
              "gen_ai_response_model": "m"}
    assert metric(text, "gen_ai_server_request_duration_seconds_count", error_type="",
                  **server) == 1
    assert metric(text, "gen_ai_server_request_duration_seconds_count", error_type="502") == 1
    assert metric(text, "gen_ai_server_time_to_first_token_seconds_count", **server) == 1
    client = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai",
              "gen_ai_request_model": "m"}
    assert metric(text, "gen_ai_client_operation_duration_seconds_count", **client) == 1
    assert metric(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input",
                  **client) == 3
    assert metric(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                  **client) == 1
    assert metric(text, "gateway_backend_available", backend="up") == 1
    assert metric(text, "gateway_backend_available", backend="gone") == 0  # out of rotation
    assert metric(text, "gateway_upstream_retries_total", backend="up") == 0
    assert metric(text, "gateway_upstream_retries_total", backend="gone") == 1
    assert metric(text, "gateway_upstream_failures_total", backend="gone") >= 1
    calls = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    answered = [s for s in calls if "error.type" not in s.attributes]
    assert [s.attributes["http.response.status_code"] for s in answered] == [200]
    gone = [s for s in calls if "error.type" in s.attributes]  # the first try and its retry
    assert [s.attributes.get("http.request.resend_count") for s in gone] == [None, 1]
    assert all(s.attributes["error.type"] == "ConnectError" for s in gone)
    assert KEY not in text
