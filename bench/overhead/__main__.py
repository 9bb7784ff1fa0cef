"""python -m bench.overhead [--quick] [--peer litellm]: the side-by-side overhead run.

Every target is started once and measured in the same run, interleaved: for each cell
(streaming or not, concurrency) each target gets a warm-up, then `rounds` batches in rotating
order. Servers are pinned to core 0, this load generator and the fake upstream to core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overhead import report
from bench.overhead.loadgen import Samples, loop_factory, new_session, run_batch
from bench.overhead.targets import (
    ROOT,
    Proc,
    cores,
    start_floor,
    start_gateway,
    start_litellm,
    start_redis,
    start_upstream,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few hundred requests (CI smoke)")
    ap.add_argument("--peer", action="append", default=[], choices=["litellm"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--count", type=int, default=None, help="requests per batch at most")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per batch at most")
    ap.add_argument("--no-workers2", action="store_true", help="skip the 2-worker gateway")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of another commit (git worktree add DIR REV): its gateway "
                         "runs as target 'baseline', side by side with this one")
    ap.add_argument("--client-compare", action="store_true",
                    help="also run the gateway with aiohttp as its upstream client "
                         "(target memgate-aiohttp), side by side")
    ap.add_argument("--shared-state", action="store_true",
                    help="also run the gateway with tenant limits in-process (memgate-limits) "
                         "and the same limits in Redis (memgate-redis: shared_state on a "
                         "redis-server this bench starts), side by side")
    ap.add_argument("--budgets", action="store_true",
                    help="also run the gateway with tenant limits in Redis (memgate-redis) and "
                         "the same plus a spend budget reserved and settled in Redis on every "
                         "request (memgate-budget), side by side")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="overhead", help="output file stem")
    args = ap.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.count = args.count or (12 if quick else 3000)
    args.seconds = args.seconds or (5.0 if quick else 2.0)
    return args


async def measure(procs: list[Proc], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for stream in (False, True):
        for conc in args.concurrency:
            sessions = {p.name: new_session(conc) for p in procs}
            got = {p.name: Samples() for p in procs}
            try:
                for p in procs:  # warm-up: connections open, caches filled; not counted
                    await run_batch(sessions[p.name], p.url + "/v1/chat/completions", p.model,
                                    p.key, stream, conc, max(2 * conc, 8), args.seconds)
                for rnd in range(args.rounds):
                    order = procs[rnd % len(procs):] + procs[:rnd % len(procs)]
                    for p in order:
                        cpu0 = p.cpu_seconds()
                        batch = await run_batch(
                            sessions[p.name], p.url + "/v1/chat/completions", p.model, p.key,
                            stream, conc, args.count, args.seconds)
                        cpu1 = p.cpu_seconds()
                        if cpu0 is not None and cpu1 is not None:
                            batch.cpu_s = cpu1 - cpu0
                        got[p.name].extend(batch)
            finally:
                for s in sessions.values():
                    await s.close()
            for p in procs:
                rows.append(report.row(p.name, stream, conc, got[p.name]))
                r = rows[-1]
                print(f"  {p.name:>10} stream={stream!s:5} c={conc:<3} {r['rps']:>8} req/s "
                      f"p50 {r['p50_ms']} ms cpu/req {r['cpu_us_per_req']} us "
                      f"errors {r['errors']} {r['last_error'][:120]}",
                      flush=True)
    report.add_overheads(rows)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    client = cores("client")
    if client is not None:
        os.sched_setaffinity(0, client)
    started: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        try:
            upstream = start_upstream(work)
            started.append(upstream)
            direct = Proc("direct", upstream.url)
            gw = start_gateway(upstream.url, work)
            started.append(gw)
            targets = [direct, gw, start_floor(upstream.url, work)]
            started.append(targets[-1])
            if args.baseline is not None:
                targets.append(start_gateway(upstream.url, work, name="baseline",
                                             source=args.baseline.resolve()))
                started.append(targets[-1])
            if args.client_compare:
                targets.append(start_gateway(upstream.url, work, name="memgate-aiohttp",
                                             module="bench.overhead.aiohttp_gateway"))
                started.append(targets[-1])
            if args.shared_state or args.budgets:
                redis = start_redis(work)
                started.append(redis)
                if args.shared_state:
                    targets.append(start_gateway(upstream.url, work, name="memgate-limits",
                                                 limits=True))
                    started.append(targets[-1])
                targets.append(start_gateway(upstream.url, work, name="memgate-redis",
                                             redis_url=redis.url))
                started.append(targets[-1])
                if args.budgets:
                    targets.append(start_gateway(upstream.url, work, name="memgate-budget",
                                                 redis_url=redis.url, budget=True))
                    started.append(targets[-1])
            if not args.no_workers2:
                targets.append(start_gateway(upstream.url, work, workers=2, name="memgate-2w"))
                started.append(targets[-1])
            if "litellm" in args.peer:
                targets.append(start_litellm(upstream.url, work))
                started.append(targets[-1])
            print("targets: " + ", ".join(f"{p.name} {p.url}" for p in targets), flush=True)
            t0 = time.time()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                rows = runner.run(measure(targets, args))
            memory = {p.name: {"idle_rss_mb": round(p.idle_rss / 2**20, 1),
                               "peak_rss_mb": round(p.rss("VmHWM") / 2**20, 1),
                               "rss_after_mb": round(p.rss() / 2**20, 1)}
                      for p in targets if p.popen is not None}
            for p in targets:
                bad = [r for r in rows if r["target"] == p.name and r["errors"]]
                if bad and p.log is not None:
                    print(f"--- {p.name} log tail ---\n{p.log.read_text()[-2000:]}")
        finally:
            for p in reversed(started):
                p.stop()
    return {"meta": {"quick": args.quick, "rounds": args.rounds, "count": args.count,
                     "seconds": args.seconds, "started": t0, "wall_s": round(time.time() - t0, 1),
                     "python": platform.python_version(), "cpus": os.cpu_count(),
                     "pinned": client is not None,
                     "command": "python -m bench.overhead " + " ".join(sys.argv[1:])},
            "results": rows, "memory": memory, "ratios": report.ratios(rows)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report.table(result["results"]))
    for name, mem in result["memory"].items():
        print(f"{name}: idle RSS {mem['idle_rss_mb']} MB, peak {mem['peak_rss_mb']} MB")
    for key, value in result["ratios"].items():
        print(f"{key}: {value}")
    report.write(args.out / f"{args.name}.json", result)
    report.plot(args.out / f"{args.name}.png", result["results"],
                "memgate hot-path overhead (gateway on 1 core)")
    print(f"wrote {args.out / (args.name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
