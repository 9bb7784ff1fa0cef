"""python -m bench.redis_client: CPU and wall time of one script call (EVALSHA of a trivial
script) with the shared state's client (policies/redis_client.py) and, side by side when it
is installed (the `bench` extra), redis-py's asyncio client with hiredis; serial and with 64
callers at once, against a redis-server this bench starts on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from bench.overhead.targets import ROOT, free_port
from policies.redis_client import RedisClient

LUA = "return {1, #KEYS, ARGV[1]}"
N = 6000


async def measure(call: Callable[[], Awaitable[object]], callers: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per call: N calls by `callers` concurrent callers."""
    await call()
    t0, w0 = time.process_time(), time.perf_counter()

    async def caller() -> None:
        for _ in range(N // callers):
            await call()

    await asyncio.gather(*(caller() for _ in range(callers)))
    return (1e6 * (time.process_time() - t0) / N, 1e6 * (time.perf_counter() - w0) / N)


async def run(url: str) -> dict[str, dict[str, list[float]]]:
    ours = RedisClient(url)
    clients: dict[str, Callable[[], Awaitable[object]]] = {
        "memgate": lambda: ours.script(LUA, ["a", "b"], [1, 2, 3])}
    try:
        import redis.asyncio as aioredis

        theirs = aioredis.from_url(url)
        script = theirs.register_script(LUA)
        clients["redis-py"] = lambda: script(keys=["a", "b"], args=[1, 2, 3])
    except ImportError:
        print("redis-py is not installed (pip install '.[bench]'): only memgate's client")
    out: dict[str, dict[str, list[float]]] = {}
    for callers in (1, 64):
        for _ in range(3):  # interleaved rounds; the medians are reported
            for name, call in clients.items():
                cpu, wall = await measure(call, callers)
                row = out.setdefault(f"{name} c={callers}", {"cpu_us": [], "wall_us": []})
                row["cpu_us"].append(cpu)
                row["wall_us"].append(wall)
    await ours.aclose()
    return out


def main() -> int:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            result = asyncio.run(run(f"redis://127.0.0.1:{port}/0"))
        finally:
            server.terminate()
            server.wait()
    print("| client | CPU µs per call (median of 3) | wall µs per call |\n|---|---|---|")
    for name, row in result.items():
        cpu, wall = sorted(row["cpu_us"])[1], sorted(row["wall_us"])[1]
        print(f"| {name} | {cpu:.0f} | {wall:.0f} |")
    out = ROOT / "bench" / "results" / "redis_client.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
