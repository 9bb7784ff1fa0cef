"""Soak: mixed traffic against a real `gateway serve` on the demo model for --minutes, watching
the gateway's RSS and, at the end, what it still holds (reservations, KV, adapter pins).

Traffic (one thread each, until the time is up): acme and globex chat, streaming and not;
completions; clients that disconnect mid-stream (after 1-3 SSE events) or right after sending
the body; a few bad requests (wrong key, unknown model, bad params) that must be 4xx.
RSS is read from /proc/PID/status every --sample-s seconds. "After warm-up" is the mean of
the samples in the last 10 s of the warm-up (20% of the run, at least 30 s, at most half);
"end" is the mean of the samples in the last 10 s of traffic. Growth = end / after warm-up - 1.

Usage: .venv/bin/python -m bench.soak --minutes 20   (bench/results/soak.json)
Not a test: tests/e2e/reliability/test_soak.py (marker `soak`, `make test-soak`) asserts on it.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.local.runtime_memory import resident_bytes  # noqa: E402
from gateway.launch import demo_config, gateway_process  # noqa: E402

ADMIN = "sk-admin-soak"
KEYS = {"acme": "sk-demo-acme", "globex": "sk-demo-globex"}
PROMPTS = ["How do I get a refund for my order?", "What are your opening hours?",
           "Can I change my delivery address?", "Tell me about the warranty.",
           "Summarise the termination clause.", "Is this contract enforceable?"]


def rss_bytes(pid: int) -> int:
    return resident_bytes(pid) or 0


@dataclass
class Tally:
    """Outcomes by kind and status, shared by the traffic threads."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1


def _body(rng: random.Random, stream: bool) -> dict[str, Any]:
    return {"model": "demo", "stream": stream, "max_tokens": rng.randint(4, 32),
            "temperature": rng.choice([0, 0.7]),
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}


def _chat(client: httpx.Client, tally: Tally, rng: random.Random, tenant: str) -> None:
    stream = rng.random() < 0.5
    headers = {"authorization": f"Bearer {KEYS[tenant]}"}
    if rng.random() < 0.2:  # a completion now and then
        body: dict[str, Any] = {"model": "demo", "prompt": rng.choice(PROMPTS), "stream": stream,
                                "max_tokens": rng.randint(4, 24)}
        path = "/completions"
    else:
        body, path = _body(rng, stream), "/chat/completions"
    with client.stream("POST", path, json=body, headers=headers) as r:
        text = r.read().decode()
    ok = r.status_code != 200 or not stream or text.rstrip().endswith("data: [DONE]")
    tally.add(f"{r.status_code}" if ok else "200-truncated")


def _raw(url: str, body: dict[str, Any], key: str) -> socket.socket:
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
              + key.encode() + b"\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def disconnect_once(url: str, rng: random.Random, key: str = KEYS["acme"]) -> str:
    """One client that leaves early: after 1-3 SSE events, or right after sending the body."""
    stream = rng.random() < 0.7
    body = {**_body(rng, stream), "max_tokens": 200, "ignore_eos": True}
    s = _raw(url, body, key)
    try:
        if not stream:
            time.sleep(rng.uniform(0, 0.05))
            return "disconnect-after-body"
        want, got = rng.randint(1, 3), b""
        while got.count(b"data: ") < want:
            chunk = s.recv(4096)
            if not chunk:
                return "disconnect-server-closed"
            got += chunk
        return f"disconnect-after-{want}-events"
    finally:
        s.close()


def _bad(client: httpx.Client, tally: Tally, rng: random.Random) -> None:
    kind = rng.choice(["key", "model", "param"])
    body = _body(rng, False)
    headers = {"authorization": f"Bearer {KEYS['acme']}"}
    if kind == "key":
        headers["authorization"] = "Bearer sk-not-a-key"
    elif kind == "model":
        body["model"] = "no-such-model"
    else:
        body["temperature"] = -3
    r = client.post("/chat/completions", json=body, headers=headers)
    tally.add(str(r.status_code))
    time.sleep(0.2)


def _loop(deadline: float, tally: Tally, step: Callable[[], None]) -> None:
    while time.monotonic() < deadline:
        try:
            step()
        except (httpx.HTTPError, OSError) as e:
            tally.add(f"error:{type(e).__name__}")


def debug_memory(url: str) -> dict[str, Any]:
    r = httpx.get(url.removesuffix("/v1") + "/debug/memory",
                  headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    r.raise_for_status()
    return dict(r.json())


def held(url: str) -> dict[str, Any]:
    """What the gateway still holds: reservations, KV bytes above idle, adapter pins, requests."""
    doc = debug_memory(url)
    local = doc["backends"]["local"]
    return {"reserved_bytes": doc["reservations"]["reserved_bytes"],
            "kv_used": local["memory"]["kv_used"],
            "adapters_pinned": local["stats"]["adapters_pinned"] or {},
            "requests_in_flight": len(doc["requests"])}


def settled(url: str, timeout: float = 15) -> dict[str, Any]:
    """held() once it is all zero, or as it is after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        h = held(url)
        if not (h["reserved_bytes"] or h["kv_used"] or h["adapters_pinned"]
                or h["requests_in_flight"]) or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_soak(minutes: float, out: Path | None = None, sample_s: float = 2.0,
             seed: int = 0) -> dict[str, Any]:
    model = ROOT / "models" / "demo"
    if not (model / "config.json").exists():
        raise SystemExit("models/demo is missing: run `make demo-model` first")
    duration = minutes * 60
    warmup = min(max(0.2 * duration, 30.0), 0.5 * duration)
    window = min(10.0, warmup)
    tally = Tally()
    samples: list[tuple[float, int]] = []
    cfg = demo_config(model)
    with tempfile.TemporaryDirectory() as tmp, gateway_process(
            cfg, Path(tmp), env={"GATEWAY_ADMIN_KEY": ADMIN}) as (url, proc):
        base = url.removesuffix("/v1")
        t0 = time.monotonic()
        deadline = t0 + duration
        clients = [httpx.Client(base_url=url, timeout=60) for _ in range(5)]
        rngs = [random.Random(seed * 100 + i) for i in range(6)]
        steps: list[Callable[[], None]] = [
            lambda: _chat(clients[0], tally, rngs[0], "acme"),
            lambda: _chat(clients[1], tally, rngs[1], "acme"),
            lambda: _chat(clients[2], tally, rngs[2], "globex"),
            lambda: _chat(clients[3], tally, rngs[3], "globex"),
            lambda: tally.add(disconnect_once(url, rngs[4],
                                              KEYS[rngs[4].choice(["acme", "globex"])])),
            lambda: _bad(clients[4], tally, rngs[5]),
        ]
        threads = [threading.Thread(target=_loop, args=(deadline, tally, s), daemon=True)
                   for s in steps]
        for t in threads:
            t.start()
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - t0, rss_bytes(proc.pid)))
            time.sleep(min(sample_s, max(0.0, deadline - time.monotonic())))
        for t in threads:
            t.join(timeout=120)
        for c in clients:
            c.close()
        end = settled(url)
        idle_rss = rss_bytes(proc.pid)
        ready = httpx.get(f"{base}/ready", timeout=10).status_code
    elapsed = samples[-1][0] if samples else 0.0
    after_warmup = _mean([r for t, r in samples if warmup - window <= t <= warmup])
    at_end = _mean([r for t, r in samples if t >= elapsed - window])
    statuses = dict(sorted(tally.counts.items()))
    result = {
        "minutes": minutes, "warmup_s": warmup, "sample_s": sample_s, "samples": len(samples),
        "rss_after_warmup_mb": after_warmup / 2**20, "rss_end_mb": at_end / 2**20,
        "rss_peak_mb": max((r for _, r in samples), default=0) / 2**20,
        "rss_idle_after_mb": idle_rss / 2**20,
        "rss_growth_pct": 100 * (at_end / after_warmup - 1) if after_warmup else 0.0,
        "requests": sum(tally.counts.values()), "by_status": statuses,
        "5xx": sum(n for k, n in statuses.items() if k.startswith("5")),
        "errors": sum(n for k, n in statuses.items() if k.startswith("error") or "truncated" in k),
        "end": end, "ready_at_end": ready,
        "rss_series_mb": [(round(t, 1), round(r / 2**20, 2)) for t, r in samples],
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def table(result: dict[str, Any]) -> str:
    rows = [("minutes", result["minutes"]), ("requests", result["requests"]),
            *((f"  {k}", v) for k, v in result["by_status"].items()),
            ("RSS after warm-up (MiB)", f"{result['rss_after_warmup_mb']:.1f}"),
            ("RSS at end (MiB)", f"{result['rss_end_mb']:.1f}"),
            ("RSS growth (%)", f"{result['rss_growth_pct']:+.2f}"),
            ("RSS peak (MiB)", f"{result['rss_peak_mb']:.1f}"),
            ("RSS idle after (MiB)", f"{result['rss_idle_after_mb']:.1f}"),
            *((f"end {k}", v) for k, v in result["end"].items()),
            ("/ready at end", result["ready_at_end"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = ap.parse_args()
    print(table(run_soak(args.minutes, args.out, args.sample_s)))


if __name__ == "__main__":
    main()
