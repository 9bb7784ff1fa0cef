"""A py-spy flame graph of `gateway serve` under load (one worker, pinned to core 0).

Run: python -m bench.overhead.profile [--seconds 10] [--stream] [--out bench/results/x.svg]
Needs py-spy (`pip install py-spy`) and permission to ptrace the gateway (root or
kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.overhead.loadgen import new_session, run_batch
from bench.overhead.targets import ROOT, cores, start_gateway, start_upstream


async def _load(url: str, key: str | None, stream: bool, conc: int, seconds: float) -> int:
    async with new_session(conc) as session:
        s = await run_batch(session, url + "/v1/chat/completions", "bench-model", key, stream,
                            conc, 10**9, seconds)
    return len(s.latency)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead.profile")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead-profile.svg")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    client = cores("client")
    if client is not None:
        os.sched_setaffinity(0, client)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up = start_upstream(work)
        gw = start_gateway(up.url, work)
        try:
            assert gw.popen is not None
            args.out.parent.mkdir(parents=True, exist_ok=True)
            rec = subprocess.Popen([spy, "record", "-p", str(gw.popen.pid), "-d",
                                    str(int(args.seconds)), "-r", "250", "-o", str(args.out),
                                    "--nonblocking", *(["--format", "raw"] if args.out.suffix == ".txt" else [])])
            done = asyncio.run(_load(gw.url, gw.key, args.stream, args.concurrency,
                                     args.seconds + 1))
            rec.wait(timeout=60)
            print(f"{done} requests; flame graph in {args.out}")
        finally:
            gw.stop()
            up.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
