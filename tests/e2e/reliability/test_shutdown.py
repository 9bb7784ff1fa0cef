"""SIGTERM: stop accepting, end in-flight streams cleanly within server.shutdown_grace_s, exit 0."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.e2e.reliability.conftest import ENV, reliability_config
from tests.server import gateway_process


def test_sigterm_ends_streams_cleanly_and_exits_zero(demo_model: Path, tmp_path: Path) -> None:
    cfg = reliability_config(demo_model)  # shutdown_grace_s: 3
    with gateway_process(cfg, tmp_path, env=ENV) as (url, proc):
        port = int(url.removesuffix("/v1").rsplit(":", 1)[1])
        body = {"model": "demo", "stream": True, "max_tokens": 1800, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me everything."}]}
        events: list[str] = []
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60,
                          headers={"authorization": "Bearer sk-demo-acme"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while len(events) < 3:
                line = next(lines)
                if line.startswith("data: "):
                    events.append(line[6:])
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = False
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                refused = True
            events += [line[6:] for line in lines if line.startswith("data: ")]
            ended = time.monotonic() - t0
        code = proc.wait(timeout=30)
    assert refused, "the gateway still accepted connections after SIGTERM"
    assert code == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    assert ended < 3 + 1.5  # within the grace period, not cut at uvicorn's deadline
    last = events[-1]
    if last != "[DONE]":  # not finished in time (1800 tokens): the stream ends with an error event
        err = json.loads(last)["error"]
        assert err["code"] == "shutting_down" and err["type"] == "service_unavailable"
    assert all(e == "[DONE]" or "choices" in json.loads(e) for e in events[:-1])
