"""The hostile neighbour (isolation issue, "Done when"): while acme sends, in turn, each of
classes 1 (100,000 messages), 2 (schemas that compile past the timeout), 3 (a 3.5 MB prompt),
7 (1,000 levels of nesting) and 9 (tools plus a 200 KB response_format), globex's plain
requests keep their p99 latency within 2x of their p99 alone in the same run, /health
answers with p99 at most 100 ms and never above 1 s, and the gateway's RSS after the run is
within 10% of before.

The solo and the hostile phases alternate (three rounds each) so that both see the same
machine; every figure is printed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.security.test_event_loop import GLOBEX, HealthWatch
from tests.server import demo_config, gateway_process

ROOT = Path(__file__).resolve().parents[3]

ROUNDS = 3
PLAIN_PER_PHASE = 12


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Raw(str):
    """JSON text put into a body as it is (1,000 levels: too deep for json.dumps)."""


def nested(depth: int) -> Raw:
    return Raw('{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}'
               + "}}" * depth)


def encode(body: dict[str, Any]) -> bytes:
    """The body as JSON, with Raw values spliced in as they are."""
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value)
            return f"@raw{len(raws) - 1}@"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"', raw)
    return text.encode()


def slow_schema(seed: int) -> dict[str, Any]:
    """About 40 KB of schema that xgrammar compiles for over 10 CPU-s (the issue's class 2:
    past the 2 s deadline, killed there)."""
    props = {f"f{seed}_{i}": {"type": "string", "pattern": f"({'|'.join('abcdefgh')}){{1,{40 + i}}}x"}
             for i in range(300)}
    return {"type": "object", "properties": props, "required": list(props)}


def hostile_bodies() -> list[tuple[str, dict[str, Any]]]:
    """The classes in turn (HOSTILE_CLASSES=3,9 picks some, to see which one costs what)."""
    picked = os.environ.get("HOSTILE_CLASSES")
    return [(path, body) for cls, path, body in _classes()
            if picked is None or str(cls) in picked.split(",")]


def _classes() -> list[tuple[int, str, dict[str, Any]]]:
    big_schema = {"type": "object", "properties": {
        f"p{i}": {"type": "string", "description": "d" * 180} for i in range(1000)}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    return [
        (1, "/v1/chat/completions", {"model": "demo", "messages": [
            {"role": "user", "content": "w"} for _ in range(100_000)]}),
        *((2, "/v1/chat/completions", {"model": "demo", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "s", "schema": slow_schema(i)}}})
          for i in range(3)),
        (3, "/v1/completions", {"model": "demo", "max_tokens": 4,
                             "prompt": "the quick brown fox jumps over the lazy dog " * 80_000}),
        (7, "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "n", "schema": nested(1000)}}}),
        (9, "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                                  "tools": [tool], "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "b", "schema": big_schema}}}),
    ]


@pytest.fixture(scope="module")
def gateway(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    cfg = demo_config(demo_model)
    cfg["server"]["max_body_bytes"] = "8MiB"
    with gateway_process(cfg, tmp_path_factory.mktemp("neighbour"),
                         env={"GATEWAY_ADMIN_KEY": "sk-admin"}) as (url, proc):
        yield url.removesuffix("/v1"), proc.pid


def plain(client: httpx.Client, base: str) -> float:
    start = time.perf_counter()
    r = client.post(f"{base}/v1/chat/completions", headers=GLOBEX, json={
        "model": "demo", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello to the team."}]})
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


@contextlib.contextmanager
def hostile(base: str, out: Path) -> Iterator[None]:
    """The hostile tenant's own process (tests/e2e/security/hostile_sender.py) while the block
    runs; it finishes the request in flight after it."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.security.hostile_sender", base,
                             str(out)], cwd=ROOT)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_hostile_neighbour_leaves_others_their_latency_and_memory(
        gateway: tuple[str, int], tmp_path: Path) -> None:
    base, pid = gateway
    solo: list[float] = []
    shared: list[float] = []
    health: list[float] = []
    sent = tmp_path / "hostile.log"
    misses = 0
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            plain(client, base)  # warm: adapters loaded, first steps compiled
        before = rss(pid)
        for _ in range(ROUNDS):
            solo += [plain(client, base) for _ in range(PLAIN_PER_PHASE)]
            start = lines(sent)
            with hostile(base, sent):
                deadline = time.monotonic() + 60
                while lines(sent) == start and time.monotonic() < deadline:
                    time.sleep(0.05)  # its start-up (imports): not sending yet
                with HealthWatch(base) as watch:
                    # a whole turn of the classes, and at least as many as alone
                    turn, n = lines(sent) + len(hostile_bodies()), 0
                    while (n < PLAIN_PER_PHASE or lines(sent) < turn) and time.monotonic() < deadline:
                        shared.append(plain(client, base))
                        n += 1
            health += watch.latencies
            misses += watch.misses
        time.sleep(2)  # grammar workers killed, pool threads idle
        after = rss(pid)
    statuses = [int(line) for line in sent.read_text().split()]
    report = {"solo_p99_s": p99(solo), "shared_p99_s": p99(shared),
              "health_p99_s": p99(health), "health_max_s": max(health), "health_misses": misses,
              "hostile_requests": len(statuses), "hostile_statuses": sorted(set(statuses)),
              "rss_before": before, "rss_after": after,
              "slowest_shared_s": sorted(shared)[-5:], "slowest_solo_s": sorted(solo)[-5:]}
    print(json.dumps(report))
    assert set(statuses) <= {400, 413} and len(statuses) >= ROUNDS, report
    assert p99(shared) <= 2 * p99(solo), report
    assert misses == 0 and p99(health) <= 0.1 and max(health) < 1.0, report
    assert after <= 1.1 * before, report


