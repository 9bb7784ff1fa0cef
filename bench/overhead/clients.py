"""Which upstream client: the same streamed chat completion through httpx's own pool, httpx
over an aiohttp transport, aiohttp directly, and the `openai` kind's own pool
(backends/upstream_http.py), interleaved, this process on core 0, the fake upstream on
core 1. Each reads the body as it arrives, in whatever pieces (no line splitting: that is the
caller's work, the same whatever the client). Run: python -m bench.overhead.clients."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

from backends.upstream_http import UpstreamHTTP
from bench.overhead.httpx_aiohttp import AiohttpTransport
from bench.overhead.loadgen import loop_factory, request_body
from bench.overhead.report import pct, write
from bench.overhead.targets import ROOT, cores, start_upstream

Call = Callable[[], Awaitable[None]]


def httpx_call(client: httpx.AsyncClient, body: bytes) -> Call:
    async def call() -> None:
        req = client.build_request("POST", "/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"})
        resp = await client.send(req, stream=True)
        try:
            async for _ in resp.aiter_bytes():
                pass
        finally:
            await resp.aclose()
    return call


def aiohttp_call(session: aiohttp.ClientSession, url: str, body: bytes) -> Call:
    async def call() -> None:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            async for _ in r.content.iter_any():
                pass
    return call


def memgate_call(pool: UpstreamHTTP, body: bytes) -> Call:
    async def call() -> None:
        resp = await pool.request("POST", "/v1/chat/completions", body)
        try:
            async for _ in resp.blocks():
                pass
        finally:
            await resp.aclose()
    return call


async def drive(call: Call, conc: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, this process's CPU µs per request)"""
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t0)

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(conc)))
    cpu = (time.process_time() - cpu0) / max(1, len(lat)) * 1e6
    return len(lat) / (time.perf_counter() - t0), (pct(lat, 0.5) or 0) * 1000, cpu


def baseline_pool(checkout: Path) -> type[UpstreamHTTP]:
    """The pool class of another checkout (git worktree add DIR REV), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_upstream_http",
                                                  checkout / "backends" / "upstream_http.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pool: type[UpstreamHTTP] = module.UpstreamHTTP
    return pool


async def measure(base: str, seconds: float, rounds: int,
                  baseline: Path | None = None) -> list[dict[str, object]]:
    body = request_body("bench-model", True)
    clients = {
        "httpx": httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=256,
                                                                      max_keepalive_connections=256)),
        "httpx+aiohttp-transport": httpx.AsyncClient(base_url=base, transport=AiohttpTransport()),
    }
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    calls = {name: httpx_call(c, body) for name, c in clients.items()}
    calls["aiohttp"] = aiohttp_call(session, base + "/v1/chat/completions", body)
    pool = UpstreamHTTP(base, {}, 5.0, 60.0, 256)
    calls["memgate-pool"] = memgate_call(pool, body)
    pools = [pool]
    if baseline is not None:
        pools.append(baseline_pool(baseline)(base, {}, 5.0, 60.0, 256))
        calls["memgate-pool-baseline"] = memgate_call(pools[-1], body)
    rows: list[dict[str, object]] = []
    try:
        for conc in (1, 64):
            got: dict[str, list[tuple[float, float, float]]] = {n: [] for n in calls}
            for call in calls.values():
                await drive(call, conc, 0.3)  # warm-up
            names = list(calls)
            for rnd in range(rounds):  # rotating order: no client always follows another
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    got[name].append(await drive(calls[name], conc, seconds))
            for name, runs in got.items():
                rps = sum(r for r, _, _ in runs) / len(runs)
                p50 = sorted(p for _, p, _ in runs)[len(runs) // 2]
                cpu = sorted(c for _, _, c in runs)[len(runs) // 2]
                rows.append({"client": name, "concurrency": conc, "rps": round(rps, 1),
                             "p50_ms": round(p50, 3), "cpu_us_per_req": round(cpu, 1)})
                print(f"{name:>24} c={conc:<3} {rps:8.1f} req/s  p50 {p50:.3f} ms  "
                      f"CPU {cpu:.1f} us/req", flush=True)
    finally:
        for c in clients.values():
            await c.aclose()
        await session.close()
        for p in pools:
            await p.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead.clients")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout: its pool runs as memgate-pool-baseline")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clients.json")
    args = ap.parse_args(argv)
    server = cores("server")
    with tempfile.TemporaryDirectory() as tmp:
        up = start_upstream(Path(tmp))
        try:
            if server is not None:
                import os

                os.sched_setaffinity(0, server)
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                rows = runner.run(measure(up.url, args.seconds, args.rounds, args.baseline))
        finally:
            up.stop()
    write(args.out, {"command": "python -m bench.overhead.clients " + " ".join(sys.argv[1:]),
                     "results": rows})
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
