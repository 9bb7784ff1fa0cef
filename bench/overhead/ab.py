"""A/B of the gateway's CPU per request: this checkout against another (--baseline DIR), both
on the same fake upstream, batches alternating between them (ABBA...), several rounds per cell.
On a shared machine one batch says little; the medians and minimums of many say more.

Run: python -m bench.overhead.ab --baseline DIR [--rounds 10] [--count 3000]
Prints a table and writes bench/results/overhead-ab.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.overhead.loadgen import new_session, run_batch
from bench.overhead.targets import ROOT, Proc, start_gateway, start_upstream

CELLS = ((False, 1), (False, 64), (True, 1), (True, 64))  # (stream, concurrency)


async def _batch(gw: Proc, stream: bool, conc: int, count: int) -> float:
    """CPU microseconds of the gateway per request over one batch."""
    async with new_session(conc) as session:
        before = gw.cpu_seconds() or 0.0
        r = await run_batch(session, gw.url + "/v1/chat/completions", "bench-model", gw.key,
                            stream, conc, count, 120)
        after = gw.cpu_seconds() or 0.0
    if r.errors:
        raise RuntimeError(f"{gw.name}: {r.errors} errors ({r.last_error})")
    return (after - before) / max(1, len(r.latency)) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead.ab", description=__doc__)
    ap.add_argument("--baseline", type=Path, required=True, help="another checkout (B)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--count", type=int, default=3000, help="requests per batch")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead-ab.json")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up = start_upstream(work)
        a = start_gateway(up.url, work, name="this")
        b = start_gateway(up.url, work, name="baseline", source=args.baseline.resolve())
        try:
            for stream, conc in CELLS:
                cpu: dict[str, list[float]] = {"this": [], "baseline": []}
                for rnd in range(args.rounds):
                    for gw in ((a, b) if rnd % 2 == 0 else (b, a)):
                        cpu[gw.name].append(asyncio.run(_batch(gw, stream, conc, args.count)))
                row: dict[str, Any] = {"stream": stream, "concurrency": conc}
                for name, values in cpu.items():
                    row[f"{name}_median_us"] = round(statistics.median(values), 1)
                    row[f"{name}_min_us"] = round(min(values), 1)
                    row[f"{name}_all_us"] = [round(v, 1) for v in values]
                row["median_ratio"] = round(row["this_median_us"] / row["baseline_median_us"], 3)
                row["min_ratio"] = round(row["this_min_us"] / row["baseline_min_us"], 3)
                rows.append(row)
                print(f"stream={stream!s:5} c={conc:<3} this {row['this_median_us']:7.1f} "
                      f"(min {row['this_min_us']:.1f})  baseline {row['baseline_median_us']:7.1f} "
                      f"(min {row['baseline_min_us']:.1f}) us/req  median x{row['median_ratio']}  "
                      f"min x{row['min_ratio']}", flush=True)
        finally:
            a.stop()
            b.stop()
            up.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": str(args.baseline), "rounds": args.rounds,
                                    "count": args.count, "cells": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
