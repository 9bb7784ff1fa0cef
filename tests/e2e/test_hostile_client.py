"""A hostile client against a real `gateway serve`, on raw sockets.
Every case runs over both URL shapes: the generation route as it is (the fast path) and with
a query string (the ASGI path), so the two cannot disagree."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

PATHS = [b"/v1/chat/completions", b"/v1/chat/completions?x=1"]
BODY = json.dumps({"model": "up", "messages": [{"role": "user", "content": "plain hello"}]}).encode()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    return host, int(port)


def read_until_closed(sock: socket.socket, limit_s: float = 20.0) -> bytes:
    """Everything the server sends until it closes (or `limit_s` passes: then b"<open>" ends it)."""
    sock.settimeout(0.5)
    out = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return out + b"<reset>"
        if not data:
            return out
        out += data
    return out + b"<open>"


def exchange(url: str, request: bytes) -> bytes:
    with socket.create_connection(address(url)) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def error_of(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def post(path: bytes, headers: list[bytes], body: bytes = BODY) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nhost: gw\r\n" + b"".join(h + b"\r\n" for h in headers)
            + b"connection: close\r\n\r\n" + body)


@pytest.mark.parametrize("path", PATHS)
def test_one_authorization_header_is_served(hostile_gateway: str, path: bytes) -> None:
    answer = exchange(hostile_gateway, post(path, [b"authorization: Bearer sk-demo-acme",
                                          b"content-type: application/json",
                                          b"content-length: %d" % len(BODY)]))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"echo:hello" in answer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("twice", [
    [b"authorization: Bearer sk-demo-acme", b"authorization: Bearer sk-demo-globex"],
    [b"authorization: Bearer sk-demo-globex", b"Authorization: Bearer sk-demo-acme"],
    [b"content-type: application/json", b"content-type: text/plain"],
    [b"content-length: %d" % len(BODY), b"content-length: %d" % len(BODY)],
])
def test_duplicate_singleton_headers_are_a_400(hostile_gateway: str, path: bytes, twice: list[bytes]) -> None:
    """Defect 6: two Authorization headers picked the last tenant on one path and the first on
    the other; now any repeated Authorization, Content-Type or Content-Length is refused."""
    headers = [b"authorization: Bearer sk-demo-acme", b"content-type: application/json",
               b"content-length: %d" % len(BODY)]
    name = twice[0].split(b":")[0].lower()
    headers = [h for h in headers if h.split(b":")[0].lower() != name] + twice
    answer = exchange(hostile_gateway, post(path, headers))
    status, error = error_of(answer)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert b"sk-demo" not in answer  # the key is never echoed


def _health_while(url: str, stop: threading.Event, seen: list[int]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            seen.append(client.get(url.removesuffix("/v1") + "/health").status_code)
            time.sleep(0.05)


@pytest.mark.parametrize("path", PATHS)
def test_a_header_value_that_never_ends_is_a_431(hostile_gateway: str, path: bytes) -> None:
    """Defect 7: a header value without its line end was buffered without limit (174 MB in
    60 s). The head is bounded on raw bytes: 431, then the connection closes."""
    stop, health = threading.Event(), []
    poller = threading.Thread(target=_health_while, args=(hostile_gateway, stop, health))
    poller.start()
    while not health:  # the poller is under way before the attack starts
        time.sleep(0.01)
    sent = 0
    try:
        with socket.create_connection(address(hostile_gateway)) as sock:
            sock.settimeout(10)
            sock.sendall(b"POST " + path + b" HTTP/1.1\r\nhost: gw\r\nx-never-ends: ")
            try:
                while sent < 64 * 2**20:
                    sock.sendall(b"v" * 65536)
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            answer = read_until_closed(sock)
        with httpx.Client(timeout=30) as client:  # and it answers after
            health.append(client.get(hostile_gateway.removesuffix("/v1") + "/health").status_code)
    finally:
        stop.set()
        poller.join()
    assert sent < 64 * 2**20  # the hostile_gateway stopped reading long before
    status, error = error_of(answer)
    assert status == 431 and error["code"] == "request_headers_too_large"
    assert health and set(health) == {200}


@pytest.mark.parametrize("path", PATHS)
def test_a_whole_head_past_64_kib_is_a_431(hostile_gateway: str, path: bytes) -> None:
    answer = exchange(hostile_gateway, post(path, [b"authorization: Bearer sk-demo-acme",
                                          b"x-big: " + b"b" * 70000,
                                          b"content-length: %d" % len(BODY)]))
    assert error_of(answer)[0] == 431


@pytest.mark.parametrize("path", PATHS)
def test_a_slow_head_times_out_with_408(hostile_gateway: str, path: bytes) -> None:
    """Defect 8: a head sent a byte at a time was kept open for good. header_timeout_s (1.5 s
    in this config) bounds it from the head's first byte: 408, then the connection closes."""
    head = b"POST " + path + b" HTTP/1.1\r\nhost: gw\r\nx-slow: " + b"s" * 200
    with socket.create_connection(address(hostile_gateway)) as sock:
        sock.settimeout(10)
        closed = False
        for i in range(len(head)):  # up to 200 x 0.1 s: far past the timeout
            try:
                sock.sendall(head[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
        answer = read_until_closed(sock)
    assert closed or not answer.endswith(b"<open>")
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "request_timeout"


def test_a_connection_that_never_sends_a_byte_is_closed(hostile_gateway: str) -> None:
    """... and one that sends nothing closes after the keep-alive timeout (2 s here)."""
    with socket.create_connection(address(hostile_gateway)) as sock:
        assert read_until_closed(sock, limit_s=30) == b""
