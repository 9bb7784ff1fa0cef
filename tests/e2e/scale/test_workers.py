"""`gateway serve --workers 2`: SIGTERM drains every worker (streams end with the
`shutting_down` event, the parent exits 0); a worker past recycle_other_bytes is replaced
with no request lost."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.scale.conftest import ENV, wait_for
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.server import ACME_SHA, demo_config, gateway_process

ACME = {"authorization": "Bearer sk-demo-acme"}
BODY = {"model": "large", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream().running() as up:
        yield up


def remote_config(upstream: str) -> dict[str, Any]:
    return {"server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY", "shutdown_grace_s": 3},
            "backends": {"up": {"kind": "openai", "url": upstream, "read_timeout": 60}},
            "models": [{"name": "large", "backend": "up"}],
            "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["large"]}]}


def test_sigterm_drains_every_worker(upstream: CountingUpstream, tmp_path: Path) -> None:
    upstream.hold()
    streams: dict[str, list[list[str]]] = {}  # worker -> the events of each held stream
    lock = threading.Lock()
    with gateway_process(remote_config(upstream.url), tmp_path, env=ENV,
                         args=("--workers", "2")) as (url, proc):

        def hold_one() -> None:
            with httpx.stream("POST", f"{url}/chat/completions", json=BODY, headers=ACME,
                              timeout=60) as r:
                events: list[str] = []
                with lock:
                    streams.setdefault(r.headers["x-gateway-worker"], []).append(events)
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        threads: list[threading.Thread] = []
        for _ in range(24):  # new connections until both workers hold streams
            t = threading.Thread(target=hold_one, daemon=True)
            t.start()
            threads.append(t)
            wait_for(lambda: sum(len(v) for v in streams.values()) == len(threads),
                     "the stream's head")
            if len(streams) == 2 and all(len(v) >= 2 for v in streams.values()):
                break
        assert len(streams) == 2, f"every stream landed on one worker: {list(streams)}"
        wait_for(lambda: all(e for v in streams.values() for e in v), "first events")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = proc.wait(30)
    upstream.release()
    assert code == 0
    for worker, held in streams.items():
        for events in held:
            err = json.loads(events[-1])["error"]
            assert err["code"] == "shutting_down", (worker, events)


def test_a_worker_past_recycle_other_bytes_is_replaced_with_no_request_lost(
        demo_model: Path, tmp_path: Path) -> None:
    """recycle_other_bytes below what the worker's `other` memory already is (1 byte): the
    first worker that checks asks to be replaced; a client sending all along loses nothing."""
    cfg = demo_config(demo_model)
    cfg["server"].update({"recycle_other_bytes": 1, "shutdown_grace_s": 5})
    with gateway_process(cfg, tmp_path, env=ENV, args=("--workers", "2")) as (url, _):
        seen: list[str] = []
        statuses: list[int] = []
        body = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2000):  # a new connection each (a kept-alive one stays on its worker)
            r = httpx.post(f"{url}/chat/completions", json=body, headers=ACME, timeout=60)
            statuses.append(r.status_code)
            worker = r.headers["x-gateway-worker"]
            if worker not in seen:
                seen.append(worker)
            if len(seen) >= 3:  # two first workers, then at least one replacement
                break
    assert len(seen) >= 3, f"no worker was replaced in {len(statuses)} requests"
    assert statuses == [200] * len(statuses)
    log = (tmp_path / "gateway.log").read_text()
    assert "replaced by" in log


def test_a_connection_accepted_before_shutdown_gets_its_answer(
        upstream: CountingUpstream, tmp_path: Path) -> None:
    """A connection accepted just before SIGTERM whose request had not arrived yet (what a
    recycled worker sees while the others serve) is answered, then closed; uvicorn closed it
    unanswered ('Server disconnected without sending a response')."""
    import socket
    import time

    with gateway_process(remote_config(upstream.url), tmp_path, env=ENV) as (url, proc):
        port = int(url.removesuffix("/v1").rsplit(":", 1)[1])
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = json.dumps({**BODY, "stream": False}).encode()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # shutdown has begun: the listener is closed, our connection is open
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"authorization: Bearer sk-demo-acme\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        conn.close()
        assert proc.wait(30) == 0
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200"), answer[:300]
    assert b"connection: close" in head
