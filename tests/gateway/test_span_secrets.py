"""No API key or Authorization value reaches a span: every error path (401, 404, 400,
413, a failing upstream) with keys in headers and in bodies, on an in-process app whose
tracer provider exports to memory; attributes, events, links and status are all scanned."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from gateway.settings import parse_settings
from tests.server import demo_config, free_port

TENANT = "sk-demo-acme"
WRONG = "sk-wrong-span-key-789"
UPSTREAM = "sk-upstream-span-secret-321"
ADMIN = "sk-admin-span-654"
SECRETS = (TENANT, WRONG, UPSTREAM, ADMIN, "sk-demo-globex")


def span_text(span: ReadableSpan) -> str:
    """Everything a span carries that an exporter would send, as one string."""
    return json.dumps({
        "name": span.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "links": [dict(link.attributes or {}) for link in span.links],
        "status": span.status.description,
    }, default=str)


async def _drive(app: Any) -> dict[str, int]:
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "user": TENANT}
    cases: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
        "401 wrong key": ("/v1/chat/completions", chat, {"authorization": f"Bearer {WRONG}"}),
        "401 key in x-api-key": ("/v1/chat/completions", chat, {"x-api-key": TENANT}),
        "404 other adapter": ("/v1/chat/completions", {**chat, "model": "demo:globex-legal"}, {}),
        "404 unknown model": ("/v1/chat/completions", {**chat, "model": "nope"}, {}),
        "404 unknown adapter": ("/v1/completions", {"model": "demo:nope", "prompt": TENANT}, {}),
        "404 key as adapter": ("/v1/chat/completions", {**chat, "model": f"demo:{TENANT}"}, {}),
        "400 bad param": ("/v1/chat/completions", {**chat, "temperature": -1}, {}),
        "400 bad json": ("/v1/chat/completions", {}, {"x-raw": "{" + TENANT}),
        "413 too large": ("/v1/chat/completions",
                          {**chat, "messages": [{"role": "user", "content": TENANT * 6000}]}, {}),
        "upstream down": ("/v1/chat/completions", {**chat, "model": "broken"}, {}),
        "upstream down stream": ("/v1/chat/completions", {**chat, "model": "broken",
                                                          "stream": True}, {}),
        "200 ok": ("/v1/chat/completions", chat, {}),
    }
    statuses: dict[str, int] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            for name, (path, body, extra) in cases.items():
                headers = {"authorization": f"Bearer {TENANT}", "api-key": TENANT,
                           "openai-api-key": UPSTREAM, "x-admin": ADMIN, **extra}
                if "x-api-key" in extra:
                    headers.pop("authorization")
                raw = headers.pop("x-raw", None)
                content = raw.encode() if raw is not None else json.dumps(body).encode()
                r = await c.post(path, content=content, timeout=60,
                                 headers={**headers, "content-type": "application/json"})
                statuses[name] = r.status_code
            r = await c.get("/debug/memory", headers={"authorization": f"Bearer {WRONG}"})
            statuses["401 admin"] = r.status_code
    return statuses


def test_no_key_in_any_span(demo_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", UPSTREAM)
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN)
    cfg = demo_config(demo_model)
    cfg["backends"]["broken"] = {"kind": "openai", "url": f"http://127.0.0.1:{free_port()}/v1",
                                 "model": "x", "api_key_env": "UPSTREAM_KEY",
                                 "connect_timeout": 1.0, "read_timeout": 1.0}
    cfg["models"].append({"name": "broken", "backend": "broken"})
    cfg["tenants"][0]["models"].append("broken")
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    statuses = asyncio.run(_drive(create_app(parse_settings(cfg), tracer_provider=tp)))
    assert statuses == {
        "401 wrong key": 401, "401 key in x-api-key": 401, "404 other adapter": 404,
        "404 unknown model": 404, "404 unknown adapter": 404, "404 key as adapter": 404,
        "400 bad param": 400,
        "400 bad json": 400, "413 too large": 413, "upstream down": statuses["upstream down"],
        "upstream down stream": statuses["upstream down stream"], "200 ok": 200,
        "401 admin": 401,
    }, statuses
    assert {statuses["upstream down"], statuses["upstream down stream"]} <= {502, 503}
    spans = exporter.get_finished_spans()
    assert len(spans) >= len(statuses) - 1  # one request span per /v1 request at least
    errors = [s for s in spans if (s.attributes or {}).get("error.type")]
    assert {str(s.attributes["error.type"]) for s in errors if s.attributes} >= {
        "400", "401", "404", "413", str(statuses["upstream down"])}
    for span in spans:
        text = span_text(span)
        for secret in SECRETS:
            assert secret not in text, (span.name, secret, text)
        assert "Bearer" not in text, (span.name, text)
