"""Broken upstreams: every fault reaches the client as an OpenAI-shaped error (an error event
inside a stream), is counted in gateway_backend_errors_total, falls back to degrade_to before
the first byte, and no key shows up in the log, the metrics or an error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.reliability.fake_upstream import FakeUpstream
from tests.server import ACME_SHA, free_port, running_gateway

UPSTREAM_KEY = "sk-upstream-secret-123"
ADMIN = "sk-admin-faults"
SECRETS = ("sk-demo-acme", ADMIN, UPSTREAM_KEY, "sk-wrong-key-456")
FAULTS = ("refused", "http500", "badjson", "badsse", "midstream", "hang")


def faults_config(upstream: str) -> dict[str, Any]:
    def backend(url: str, mode: str) -> dict[str, Any]:
        return {"kind": "openai", "url": url, "model": mode, "api_key_env": "UPSTREAM_KEY",
                "read_timeout": 1.5, "connect_timeout": 1.0}

    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    backends = {mode: backend(closed if mode == "refused" else upstream, mode) for mode in FAULTS}
    backends["ok"] = backend(upstream, "ok")
    models = [{"name": m, "backend": m} for m in (*FAULTS, "ok")]
    models.append({"name": "refused-fb", "backend": "refused", "degrade_to": "ok"})
    models.append({"name": "http500-fb", "backend": "http500", "degrade_to": "ok"})
    names = [m["name"] for m in models]
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
        # only degrade: the fallback to degrade_to is its (policies: [] turns that off too)
        "backends": backends, "models": models, "policies": ["degrade"],
        "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": names}],
    }


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeUpstream, Path]]:
    workdir = tmp_path_factory.mktemp("faults")
    with FakeUpstream().running() as up, running_gateway(
            faults_config(up.url), workdir, ready_path="/health",
            env={"UPSTREAM_KEY": UPSTREAM_KEY, "GATEWAY_ADMIN_KEY": ADMIN}) as url:
        yield url, up, workdir


def _post(url: str, model: str, stream: bool, key: str = "sk-demo-acme") -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", timeout=30, headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "stream": stream, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "hi"}]})


def _error_shape(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in json.dumps(body)
    return dict(body["error"])


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["refused", "http500", "badjson", "badsse", "hang"])
def test_fault_before_the_first_byte_is_an_openai_error(
        faulty: tuple[str, FakeUpstream, Path], fault: str, stream: bool) -> None:
    url, _, _ = faulty
    r = _post(url, fault, stream)
    assert r.status_code in (502, 503, 504), (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = _error_shape(r.json())
    if fault == "hang":
        assert r.status_code in (503, 504)
    assert err["code"]


def test_upstream_stopping_mid_stream_ends_with_an_error_event(
        faulty: tuple[str, FakeUpstream, Path]) -> None:
    url, _, _ = faulty
    r = _post(url, "midstream", stream=True)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events  # a truncated answer must not look complete
    assert json.loads(events[0])["choices"]  # the first byte went out before the failure
    _error_shape(json.loads(events[-1]))
    r = _post(url, "midstream", stream=False)
    assert r.status_code in (502, 503) and _error_shape(r.json())


@pytest.mark.parametrize("model", ["refused-fb", "http500-fb"])
def test_failure_before_the_first_byte_falls_back_to_the_next_tier(
        faulty: tuple[str, FakeUpstream, Path], model: str) -> None:
    url, _, _ = faulty
    for stream in (False, True):
        r = _post(url, model, stream)
        assert r.status_code == 200, r.text
        assert "hello" in r.text and "world" in r.text
        assert r.headers.get("x-gateway-backend") == "ok"


def test_failures_are_counted_and_no_secret_leaks(faulty: tuple[str, FakeUpstream, Path]) -> None:
    url, up, workdir = faulty
    bodies = []
    for fault in FAULTS:
        bodies.append(_post(url, fault, stream=True).text)
    bodies.append(_post(url, "ok", stream=False, key="sk-wrong-key-456").text)  # 401
    bodies.append(httpx.get(url.removesuffix("/v1") + "/debug/memory", timeout=10,
                            headers={"authorization": "Bearer sk-demo-acme"}).text)  # not admin
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    for fault in FAULTS:
        assert _metric(metrics, "gateway_backend_errors_total", backend=fault) >= 1, fault
    assert _metric(metrics, "gateway_backend_errors_total", backend="midstream",
                   phase="mid_stream") >= 1
    assert f"Bearer {UPSTREAM_KEY}" in up.authorizations  # the key did reach the upstream ...
    log = (workdir / "gateway.log").read_text()
    for secret in SECRETS:  # ... and nowhere else
        assert secret not in log and secret not in metrics, secret
        assert all(secret not in b for b in bodies), secret
    assert "bearer" not in log.lower() and "authorization" not in metrics.lower()
