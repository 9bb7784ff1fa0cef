"""Bad input at the HTTP layer: each a clear 4xx (OpenAI's shape where the app answers),
never a hang or a 500. Field-level cases (each a 400 naming its param, the NaN and Infinity
literals among them) are in process: tests/gateway/test_validation.py and
tests/gateway/test_handler.py."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from tests.e2e.reliability.conftest import METRICS_KEY

AUTH = {"authorization": "Bearer sk-demo-acme"}
PROMPT = [{"role": "user", "content": "hi"}]


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    return host, int(port)


def _openai_error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.mark.parametrize("size", [100_000, 4_000_000])
def test_huge_headers_are_refused_quickly(rel_gateway: str, size: int) -> None:
    t0 = time.monotonic()
    try:
        r = httpx.get(f"{rel_gateway}/models", headers={**AUTH, "x-big": "a" * size}, timeout=20)
        assert r.status_code in (400, 431), r.status_code
    except httpx.RemoteProtocolError:
        pass  # the server closed the connection while the client was still sending
    assert time.monotonic() - t0 < 10
    assert httpx.get(f"{rel_gateway}/models", headers=AUTH, timeout=10).status_code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", ""])
def test_wrong_content_type_is_415(rel_gateway: str, ctype: str) -> None:
    body = json.dumps({"model": "demo", "messages": PROMPT, "max_tokens": 2})
    r = httpx.post(f"{rel_gateway}/chat/completions", content=body,
                   headers={**AUTH, "content-type": ctype}, timeout=30)
    assert r.status_code == 415, r.text
    assert _openai_error(r)["code"] == "unsupported_media_type"


def test_json_content_type_with_charset_is_fine(rel_gateway: str) -> None:
    body = json.dumps({"model": "demo", "messages": PROMPT, "max_tokens": 2})
    r = httpx.post(f"{rel_gateway}/chat/completions", content=body,
                   headers={**AUTH, "content-type": "application/json; charset=utf-8"}, timeout=30)
    assert r.status_code == 200, r.text


def test_slow_body_times_out_with_408(rel_gateway: str) -> None:
    s = socket.create_connection(_host_port(rel_gateway))
    s.settimeout(20)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-demo-acme\r\n"
              b"content-type: application/json\r\ncontent-length: 500\r\n\r\n{\"model\"")
    reply = s.recv(65536)
    elapsed = time.monotonic() - t0
    while b"\r\n\r\n" not in reply or not _complete(reply):  # head and body may come apart
        more = s.recv(65536)
        if not more:
            break
        reply += more
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert 1.0 < elapsed < 10  # server.body_timeout_s is 1.5 here
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"]["code"] == "request_timeout"


def _complete(reply: bytes) -> bool:
    """Whether an HTTP/1.1 response with a content-length has all of its body."""
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def test_metrics_need_the_metrics_key_when_configured(rel_gateway: str) -> None:
    url = rel_gateway.removesuffix("/v1") + "/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers=AUTH, timeout=10).status_code == 401  # a tenant key is not it
    r = httpx.get(url, headers={"authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
    assert r.status_code == 200 and "gateway_requests_total" in r.text
