"""Engine throughput side by side: memgate in-process, transformers(+peft), and `gateway serve`
over HTTP, on any local checkpoint, in one run.

    .venv/bin/python -m bench.engine --model models/mid [--dtype float32,bfloat16] [--http]

Each cell is a batch of B greedy requests (prompts of about --prompt tokens from the demo
corpus, exactly --new tokens each, EOS ignored) submitted at once; tok/s = B x new / the wall
time from submission to the last token (prefill included). "8 adapters" serves request i with
adapter rand-(i mod 8) of MODEL/adapters (`gateway demo-model --size mid` writes them; peft
mixes them through `adapter_names`). Targets run in their own processes and are interleaved:
every repeat runs every cell on every target, back to back: a kind's dtypes next to each
other, the kinds rotating and the dtypes alternating per repeat.
The tables give medians of tok/s and (steadier on a shared machine) of tokens per CPU-second
of the target's process (every thread; for HTTP the gateway's, not the load generator's), and
ratios as the median over repeats of each repeat's ratio (samples of one cell and repeat are
taken seconds apart, so the machine's drift over minutes cancels; a ratio of medians pairs
samples from different minutes); "best hf" is, per repeat, the faster of the transformers
configurations run (`--hf-threads default,1`: torch's default threads and one thread). The
HTTP target is a real `gateway serve` (default policy chain) driven by an httpx load
generator in this process, on the same machine. With two dtypes, a last table divides bfloat16 by float32.
Writes bench/results/engine-<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.hf.tokenizer import ChatTokenizer  # noqa: E402
from backends.local.commands.demo import DATA_DIR  # noqa: E402
from gateway.launch import gateway_process  # noqa: E402

KEY = "sk-bench"
Cell = tuple[int, int]  # (batch, adapters)


def prompts_for(tok: ChatTokenizer, n: int, length: int) -> list[str]:
    """n different texts of about `length` tokens (windows over the demo corpus)."""
    corpus = " ".join(p.read_text(encoding="utf-8") for p in sorted(DATA_DIR.glob("*.txt")))
    ids = tok.encode(corpus, add_special_tokens=False)
    stride = max(1, (len(ids) - length) // max(n, 1))
    return [tok.decode(ids[i * stride : i * stride + length - 1]) for i in range(n)]


class Worker:
    """A target in its own process (bench/engine_targets.py), one JSON line each way."""

    def __init__(
        self, target: str, args: argparse.Namespace, dtype: str, max_batch: int,
        threads: int | None,
    ) -> None:
        cmd = [sys.executable, "-m", "bench.engine_targets", target, "--model", str(args.model),
               "--dtype", dtype, "--max-batch", str(max_batch), "--device", args.device]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.threads = int(self._read()["threads"])
        self.resizes = 0  # the last run's team resizes (memgate)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench target exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def run(self, prompts: list[list[int]], adapters: int, new: int) -> tuple[float, float]:
        """(wall seconds, the target process's CPU seconds) of one batch."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "adapters": adapters, "new": new}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        answer = self._read()
        self.resizes = int(answer.get("resizes", 0))
        return float(answer["seconds"]), float(answer["cpu"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


class Http:
    """`gateway serve` on the same checkpoint, driven over HTTP from this process."""

    def __init__(self, url: str, pid: int, texts: list[str], threads: int) -> None:
        self.url, self.pid, self.texts, self.threads = url, pid, texts, threads
        self.resizes = 0  # the gateway's team resizes are not observed over HTTP: kept as 0

    def cpu(self) -> float:
        """The gateway process's CPU seconds so far (every thread; not the load generator)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def _batch(self, texts: list[str], adapters: int, new: int) -> float:
        limits = httpx.Limits(max_connections=len(texts) + 1)
        async with httpx.AsyncClient(base_url=self.url, timeout=600, limits=limits,
                                     headers={"authorization": f"Bearer {KEY}"}) as client:
            bodies = [{"model": f"bench:rand-{i % adapters}" if adapters else "bench",
                       "prompt": t, "max_tokens": new, "temperature": 0, "ignore_eos": True}
                      for i, t in enumerate(texts)]
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(client.post("/completions", json=b) for b in bodies))
            seconds = time.perf_counter() - t0
        for r in replies:
            r.raise_for_status()
            if r.json()["usage"]["completion_tokens"] != new:
                raise RuntimeError(f"the gateway made {r.json()['usage']} tokens, not {new}")
        return seconds

    def run(self, prompts: list[list[int]], adapters: int, new: int) -> tuple[float, float]:
        cpu = self.cpu()
        seconds = asyncio.run(self._batch(self.texts[: len(prompts)], adapters, new))
        return seconds, self.cpu() - cpu

    def close(self) -> None:
        return None


def gateway_config(args: argparse.Namespace, dtype: str, max_batch: int) -> dict[str, Any]:
    server: dict[str, Any] = {"max_body_bytes": "1MiB"}
    if args.threads is not None:
        server["torch_threads"] = args.threads
    adapters = sorted(p.name for p in (args.model / "adapters").iterdir())
    return {
        "server": server,
        "backends": {"local": {
            "kind": "local", "model": str(args.model.resolve()), "dtype": dtype,
            "device": args.device, "kv_cache_bytes": "256MiB",
            "adapters_dir": str((args.model / "adapters").resolve()),
            "adapter_cache_bytes": "64MiB", "max_loras": 8, "max_batch_size": max_batch,
        }},
        "models": [{"name": "bench", "backend": "local"}],
        "tenants": [{"name": "bench", "api_keys_env": "BENCH_KEYS", "models": ["bench"],
                     "allowed_adapters": {"bench": adapters}}],
    }


@contextmanager
def http_target(
    args: argparse.Namespace, dtype: str, texts: list[str], max_batch: int
) -> Iterator[Http]:
    with tempfile.TemporaryDirectory() as tmp, gateway_process(
        gateway_config(args, dtype, max_batch), Path(tmp), env={"BENCH_KEYS": KEY}, timeout=300
    ) as (url, proc):
        from backends.local import placement

        yield Http(url, proc.pid, texts, placement.resolve_threads(args.threads))


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    info: dict[str, Any] = {"nproc": os.cpu_count(), "cpu": model, "torch": torch.__version__,
                            "python": platform.python_version(), "loadavg": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


Results = dict[str, dict[Cell, list[float]]]


def run_order(names: list[str], dtypes: list[str], rep: int) -> list[str]:
    """The targets of one cell in repeat `rep`: a kind's dtypes back to back (the bfloat16 /
    float32 ratio pairs samples seconds apart), the kinds rotating per repeat and the dtypes
    within a kind alternating, so no target always runs first or right after another."""
    kinds = list(dict.fromkeys(n.split("/")[0] for n in names))
    kinds = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]
    ds = dtypes if rep % 2 == 0 else dtypes[::-1]
    return [f"{k}/{d}" for k in kinds for d in ds if f"{k}/{d}" in names]


def medians(results: Results) -> dict[str, dict[Cell, float]]:
    return {n: {c: statistics.median(v) for c, v in cells.items()} for n, cells in results.items()}


def ratio(results: Results, num: str, dens: list[str], cell: Cell) -> float:
    """The median over repeats of num / (the best of dens) in that repeat: a cell's targets
    run back to back within a repeat, so each ratio pairs samples taken under the same load."""
    return statistics.median(
        x / max(results[d][cell][i] for d in dens) for i, x in enumerate(results[num][cell]))


def table(cells: list[Cell], results: Results, dtype: str, unit: str = "tok/s") -> str:
    """One dtype's table: tok/s per target, memgate / best hf, memgate / each hf, http ratio."""
    med = medians(results)
    names = [n for n in med if n.endswith(f"/{dtype}")]
    hfs = [n for n in names if n.startswith("hf")]
    http, mine = f"http/{dtype}", f"memgate/{dtype}"
    head = "| batch | adapters | " + " | ".join(f"{n.split('/')[0]} {unit}" for n in names)
    if hfs:
        head += " | memgate / best hf" + "".join(f" | memgate / {n.split('/')[0]}" for n in hfs)
    head += " | http / in-process" if http in med else ""
    lines = [head + " |", "|" + "---|" * (head.count("|") - 0)]
    for cell in cells:
        row = f"| {cell[0]} | {cell[1] or 'none'} | " + " | ".join(
            f"{med[n][cell]:,.1f}" for n in names)
        if hfs:
            row += f" | **{ratio(results, mine, hfs, cell):.2f}x**"
            row += "".join(f" | {ratio(results, mine, [n], cell):.2f}x" for n in hfs)
        if http in med:
            row += f" | {ratio(results, http, [mine], cell):.2f}"
        lines.append(row + " |")
    return "\n".join(lines)


def dtype_table(cells: list[Cell], results: Results, dtypes: list[str]) -> str:
    kinds = [k for k in ("memgate", "http") if all(f"{k}/{d}" in results for d in dtypes)]
    lines = ["| batch | adapters | " + " | ".join(f"{k} {dtypes[1]} / {dtypes[0]}" for k in kinds)
             + " |", "|---|---|" + "---|" * len(kinds)]
    for cell in cells:
        lines.append(f"| {cell[0]} | {cell[1] or 'none'} | " + " | ".join(
            f"{ratio(results, f'{k}/{dtypes[1]}', [f'{k}/{dtypes[0]}'], cell):.2f}x"
            for k in kinds) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/mid"))
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, or both (comma)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", default="1:0,8:0,8:8,32:0",
                    help="batch:adapters,... (adapters 0 = base model)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--http", action="store_true", help="also `gateway serve` over HTTP")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--threads", type=int, default=None, help="memgate torch threads (default: auto)")
    ap.add_argument("--hf-threads", default="default,1",
                    help="transformers torch threads, a comma list: default (torch's) and/or N")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dtypes = args.dtype.split(",")
    loadavg_at_start = os.getloadavg()  # the machine is shared: say how busy it was
    cells = [(int(b), int(a)) for b, a in (c.split(":") for c in args.cells.split(","))]
    max_batch = max(b for b, _ in cells)
    tok = ChatTokenizer.from_dir(args.model)
    texts = prompts_for(tok, max_batch, args.prompt)
    prompts = [tok.encode(t) for t in texts]  # what the gateway's completion path encodes
    if len({len(p) for p in prompts}) != 1:
        width = min(len(p) for p in prompts)  # transformers takes a rectangular batch
        texts = [tok.decode(p[1:width]) for p in prompts]
        prompts = [tok.encode(t) for t in texts]
    with ExitStack() as stack:
        targets: dict[str, Worker | Http] = {}
        for dtype in dtypes:
            targets[f"memgate/{dtype}"] = Worker("memgate", args, dtype, max_batch, args.threads)
            for spec in [] if args.no_hf else args.hf_threads.split(","):
                threads = None if spec == "default" else int(spec)
                name = "hf" if threads is None else f"hf@{threads}t"
                targets[f"{name}/{dtype}"] = Worker("hf", args, dtype, max_batch, threads)
            if args.http:
                targets[f"http/{dtype}"] = stack.enter_context(
                    http_target(args, dtype, texts, max_batch))
        for t in targets.values():
            stack.callback(t.close)
        results: Results = {n: {c: [] for c in cells} for n in targets}
        per_cpu: Results = {n: {c: [] for c in cells} for n in targets}
        resizes: dict[str, dict[Cell, list[int]]] = {n: {c: [] for c in cells} for n in targets}
        for t in targets.values():  # warm-up: every cell once, a few tokens (adapters load)
            for batch, adapters in cells:
                t.run(prompts[:batch], adapters, 4)
        for rep in range(args.repeats):
            for cell in cells:
                batch, adapters = cell
                for name in run_order(list(targets), dtypes, rep):
                    target = targets[name]
                    seconds, cpu = target.run(prompts[:batch], adapters, args.new)
                    results[name][cell].append(batch * args.new / seconds)
                    per_cpu[name][cell].append(batch * args.new / max(cpu, 1e-9))
                    resized = target.resizes
                    resizes[name][cell].append(resized)
                    print(f"repeat {rep + 1} batch {batch:>2} adapters {adapters or 'none':>4} "
                          f"{name:<18} {batch * args.new / seconds:8.1f} tok/s "
                          f"{batch * args.new / max(cpu, 1e-9):8.1f} tok/CPU-s"
                          + (f" (team resized {resized}x)" if resized else ""), flush=True)
        teams = {n: t.threads for n, t in targets.items()}
    med, med_cpu = medians(results), medians(per_cpu)
    print(f"\n{args.model} on {args.device}, prompts {len(prompts[0])} tokens, {args.new} new, "
          f"greedy, medians of {args.repeats}; torch threads {teams}")
    tables = {d: table(cells, results, d) for d in dtypes}
    if len(dtypes) == 2:
        tables[f"{dtypes[1]} / {dtypes[0]}"] = dtype_table(cells, results, dtypes)
    for d in dtypes:  # steadier on a shared machine: tokens per CPU-second of the target process
        tables[f"{d}, tokens per CPU-second"] = table(cells, per_cpu, d, "tok/CPU-s")
    for title, text in tables.items():
        print(f"\n{title}\n{text}")
    out = args.out or ROOT / "bench" / "results" / f"engine-{args.model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "-m", "bench.engine", *sys.argv[1:]]),
        "machine": {**machine(), "loadavg_at_start": loadavg_at_start}, "model": str(args.model), "device": args.device,
        "prompt_tokens": len(prompts[0]), "new_tokens": args.new, "threads": teams,
        "tables": tables,
        "cells": [{"batch": b, "adapters": a, **{n: {
            "tok_s": results[n][(b, a)], "median": med[n][(b, a)],
            "tok_per_cpu_s": per_cpu[n][(b, a)], "median_per_cpu_s": med_cpu[n][(b, a)],
            "team_resizes": resizes[n][(b, a)]}
            for n in results}} for b, a in cells],
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
