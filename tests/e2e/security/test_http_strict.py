"""Strict HTTP/1.1 and one source of headers on a real `gateway serve` (the demo model), on
raw sockets, over both HTTP paths: the generation route as it is (the fast writer) and with a
query string or another route (the ASGI app).

- a chunked body's trailer fields never become request headers (item 4: a trailer
  `Authorization` chose the tenant);
- no slash redirects: `/admin/reload/` is a 404 in OpenAI's shape, not a 307 to the client's
  own Host (item 15);
- HTTP/1.1 only: a request line without a version, HTTP/1.0 (but for GET/HEAD on /health,
  /ready and /metrics) and other versions are 400; a Transfer-Encoding other than one final
  `chunked` is 501; each refusal closes the connection (item 16)."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from tests.e2e.test_hostile_client import address, read_until_closed

ACME, GLOBEX = "sk-demo-acme", "sk-demo-globex"
FAST, ASGI = "/v1/chat/completions", "/v1/chat/completions?x=1"
BODY = json.dumps({"model": "demo", "max_tokens": 1, "temperature": 0,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def exchange(url: str, request: bytes, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send `request` alone on a new connection; the one answer up to the server's close:
    (status, headers with lower-case names, body). `head_only`: the answer to a HEAD."""
    with socket.create_connection(address(url), timeout=10) as sock:
        sock.sendall(request)
        answer = read_until_closed(sock, limit_s=30.0)
    assert not answer.endswith((b"<open>", b"<reset>")), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    # one answer, and nothing after it
    assert len(body) == (0 if head_only else int(headers["content-length"])), answer
    return int(lines[0].split(" ")[1]), headers, body


def error_of(body: bytes) -> dict[str, Any]:
    """The OpenAI-shaped error of an answer body (all four fields, nothing else)."""
    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    return dict(doc["error"])


def chunked(method: str, path: str, head: list[str], trailers: list[str],
            body: bytes = BODY) -> bytes:
    """A chunked request (in two chunks) whose last chunk carries `trailers`."""
    lines = [f"{method} {path} HTTP/1.1", "host: gw", "transfer-encoding: chunked",
             "connection: close", *head]
    half = len(body) // 2
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])
    ) + b"0\r\n" + "".join(f"{t}\r\n" for t in trailers).encode() + b"\r\n"


def plain(method: str, path: str, version: str = " HTTP/1.1", head: tuple[str, ...] = (),
          body: bytes = b"", host: str = "gw") -> bytes:
    """A request with a content-length body; `version` is all of the request line after the
    target (empty: a request line without one)."""
    lines = [f"{method} {path}{version}", f"host: {host}", "connection: close", *head]
    if body:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---------------------------------------------------------------- item 4: trailers


@pytest.mark.parametrize("path", [FAST, ASGI])
def test_a_trailer_authorization_does_not_change_the_tenant(demo_gateway: str, path: str) -> None:
    """The head says acme, a trailer says globex: served as acme (its adapter), on both paths."""
    status, headers, body = exchange(demo_gateway, chunked(
        "POST", path, [f"authorization: Bearer {ACME}", "content-type: application/json"],
        [f"authorization: Bearer {GLOBEX}"]))
    assert status == 200, body
    assert headers["x-gateway-adapter"] == "acme-support"
    assert json.loads(body)["object"] == "chat.completion"


@pytest.mark.parametrize(("method", "path"), [("POST", FAST), ("POST", ASGI),
                                              ("GET", "/v1/models")])
def test_a_trailer_authorization_alone_is_no_key(demo_gateway: str, method: str,
                                                 path: str) -> None:
    """No key in the head, a tenant's key in a trailer: 401, on both paths."""
    status, headers, body = exchange(demo_gateway, chunked(
        method, path, ["content-type: application/json"], [f"authorization: Bearer {ACME}"]))
    assert status == 401, body
    assert error_of(body)["code"] == "missing_api_key"  # the trailer's key was never seen
    assert "x-gateway-adapter" not in headers


# ---------------------------------------------------------------- item 15: no slash redirects


@pytest.mark.parametrize(("method", "path"), [("POST", "/admin/reload/"), ("GET", "/health/"),
                                              ("GET", "/metrics/")])
def test_a_trailing_slash_is_a_404_not_a_redirect(demo_gateway: str, method: str,
                                                  path: str) -> None:
    status, headers, body = exchange(demo_gateway, plain(
        method, path, head=("authorization: Bearer sk-admin",), host="evil.example"))
    assert status == 404, body
    assert "location" not in headers
    err = error_of(body)
    assert err["code"] == "unknown_url" and err["type"] == "invalid_request_error"
    assert path in err["message"] and "evil.example" not in body.decode()


# ---------------------------------------------------------------- item 16: HTTP/1.1 only


@pytest.mark.parametrize("request_bytes", [
    b"GET /health\r\n\r\n",
    b"GET /health\r\nhost: gw\r\n\r\n",
    plain("GET", "/v1/models", version="", head=(f"authorization: Bearer {ACME}",)),
    plain("POST", FAST, version="", head=(f"authorization: Bearer {ACME}",), body=BODY),
], ids=["health-bare", "health-headers", "models", "chat"])
def test_a_request_line_without_a_version_is_a_400(demo_gateway: str,
                                                   request_bytes: bytes) -> None:
    """httptools takes `GET /health` + CRLF for HTTP/0.9 once the head ends (a bare line alone
    is a head still incomplete to it: the head deadline, 408, answers that one)."""
    status, headers, body = exchange(demo_gateway, request_bytes)
    assert status == 400, body
    assert headers["connection"] == "close"
    assert error_of(body)["code"] == "unsupported_http_version"


@pytest.mark.parametrize(("method", "path", "version", "body"), [
    ("POST", FAST, "1.0", BODY), ("POST", ASGI, "1.0", BODY), ("GET", "/v1/models", "1.0", b""),
    ("GET", "/debug/config", "1.0", b""), ("POST", "/health", "1.0", b""),
    ("POST", FAST, "2.0", BODY), ("GET", "/health", "2.0", b""), ("GET", "/health", "0.9", b""),
])
def test_other_versions_are_a_400(demo_gateway: str, method: str, path: str, version: str,
                                  body: bytes) -> None:
    status, headers, answer = exchange(demo_gateway, plain(
        method, path, version=f" HTTP/{version}", head=(f"authorization: Bearer {ACME}",),
        body=body))
    assert status == 400, answer
    assert headers["connection"] == "close"
    err = error_of(answer)
    assert err["code"] == "unsupported_http_version" and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("HEAD", "/health"),
                                              ("GET", "/ready"), ("GET", "/metrics"),
                                              ("GET", "/health?probe=lb")])
def test_health_checks_over_http10_are_served(demo_gateway: str, method: str, path: str) -> None:
    status, headers, body = exchange(demo_gateway, plain(method, path, version=" HTTP/1.0"),
                                     head_only=method == "HEAD")
    assert status == 200, body
    assert headers["connection"] == "close"  # HTTP/1.0: one request per connection
    if method == "HEAD":
        assert body == b"" and int(headers["content-length"]) > 0
    elif path == "/metrics":
        assert b"gateway_" in body
    else:
        assert json.loads(body)["status"] == ("ready" if path == "/ready" else "ok")


@pytest.mark.parametrize("path", [FAST, ASGI])
@pytest.mark.parametrize("coding", [
    ["transfer-encoding: gzip, chunked"],  # httptools accepts it (chunked is last)
    ["transfer-encoding: identity, chunked"],
    ["transfer-encoding: gzip", "transfer-encoding: chunked"],  # the same, as two headers
    ["transfer-encoding: chunked", "transfer-encoding: chunked"],  # httptools refuses these
    ["transfer-encoding: chunked, gzip"],
    ["transfer-encoding: gzip"],
], ids=["gzip-chunked", "identity-chunked", "two-headers", "chunked-twice", "chunked-gzip",
        "gzip"])
def test_a_transfer_coding_other_than_chunked_is_a_501(demo_gateway: str, path: str,
                                                       coding: list[str]) -> None:
    request = chunked("POST", path, [f"authorization: Bearer {ACME}",
                                     "content-type: application/json"], [])
    request = request.replace(b"transfer-encoding: chunked\r\n",
                              "".join(f"{c}\r\n" for c in coding).encode(), 1)
    status, headers, body = exchange(demo_gateway, request)
    assert status == 501, body
    assert headers["connection"] == "close"
    err = error_of(body)
    assert err["code"] == "unsupported_transfer_encoding"
    assert "x-gateway-adapter" not in headers


@pytest.mark.parametrize("path", [FAST, ASGI])
def test_chunked_alone_is_still_served(demo_gateway: str, path: str) -> None:
    """What the refusals above must leave alone: `chunked`, any case, with blanks around."""
    request = chunked("POST", path, [f"authorization: Bearer {ACME}",
                                     "content-type: application/json"], [])
    request = request.replace(b"transfer-encoding: chunked", b"Transfer-Encoding:  Chunked ", 1)
    status, headers, body = exchange(demo_gateway, request)
    assert status == 200, body
    assert headers["x-gateway-adapter"] == "acme-support"
