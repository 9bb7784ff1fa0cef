"""Statistics of a cell, the printed table, overhead.json and the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.overhead.loadgen import Samples


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def row(target: str, stream: bool, concurrency: int, s: Samples) -> dict[str, Any]:
    return {
        "target": target, "stream": stream, "concurrency": concurrency,
        "requests": len(s.latency), "errors": s.errors, "last_error": s.last_error,
        "rps": round(len(s.latency) / s.elapsed, 1) if s.elapsed else 0.0,
        "p50_ms": _ms(pct(s.latency, 0.5)), "p99_ms": _ms(pct(s.latency, 0.99)),
        "ttft_p50_ms": _ms(pct(s.ttft, 0.5)), "ttft_p99_ms": _ms(pct(s.ttft, 0.99)),
        # the server process tree's CPU per answered request: steadier than latency on a
        # shared machine (a batch's CPU includes its failed requests, if any)
        "cpu_us_per_req": (round(s.cpu_s / len(s.latency) * 1e6, 1)
                           if s.cpu_s is not None and s.latency else None),
    }


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """added_* = the target's percentile minus direct-to-upstream's, same cell, same run."""
    direct = {(r["stream"], r["concurrency"]): r for r in rows if r["target"] == "direct"}
    for r in rows:
        d = direct.get((r["stream"], r["concurrency"]))
        for key in ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
            mine, base = r.get(key), d.get(key) if d else None
            r["added_" + key] = None if mine is None or base is None else round(mine - base, 3)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


COLUMNS = ("target", "stream", "concurrency", "rps", "p50_ms", "p99_ms", "added_p50_ms",
           "added_p99_ms", "ttft_p50_ms", "added_ttft_p50_ms", "added_ttft_p99_ms",
           "cpu_us_per_req", "errors")


def table(rows: list[dict[str, Any]]) -> str:
    cells = [list(COLUMNS)] + [[_fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c[i].rjust(widths[i]) for i in range(len(COLUMNS))) + " |"
             for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """memgate's requests/s at the highest concurrency over each peer's, per mode."""
    out: dict[str, float] = {}
    top = max(r["concurrency"] for r in rows)
    for stream in (False, True):
        cell = {r["target"]: r["rps"] for r in rows if r["concurrency"] == top
                and r["stream"] == stream}
        mode = "stream" if stream else "json"
        for peer in ("floor", "litellm", "direct", "memgate-aiohttp"):
            if cell.get("memgate") and cell.get(peer):
                out[f"memgate_over_{peer}_{mode}_c{top}"] = round(cell["memgate"] / cell[peer], 3)
        if cell.get("memgate") and cell.get("memgate-2w"):
            out[f"memgate_2w_over_1w_{mode}_c{top}"] = round(cell["memgate-2w"] / cell["memgate"], 3)
        if cell.get("memgate-limits") and cell.get("memgate-redis"):
            out[f"redis_over_local_limits_{mode}_c{top}"] = round(
                cell["memgate-redis"] / cell["memgate-limits"], 3)
        if cell.get("memgate-redis") and cell.get("memgate-budget"):
            out[f"budget_over_no_budget_redis_{mode}_c{top}"] = round(
                cell["memgate-budget"] / cell["memgate-redis"], 3)
    return out


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


COLORS = {"direct": "#1f77b4", "memgate": "#2ca02c", "memgate-2w": "#98df8a", "baseline": "#9467bd",
          "memgate-aiohttp": "#8c564b", "memgate-limits": "#17becf", "memgate-redis": "#e377c2",
          "memgate-budget": "#bcbd22", "floor": "#ff7f0e", "litellm": "#d62728"}


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in dict.fromkeys(r["target"] for r in rows) if t != "direct"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lo = min(r["concurrency"] for r in rows)
    hi = max(r["concurrency"] for r in rows)
    metrics = (("json p50", False, "added_p50_ms"), ("json p99", False, "added_p99_ms"),
               ("stream TTFT p50", True, "added_ttft_p50_ms"),
               ("stream TTFT p99", True, "added_ttft_p99_ms"))
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        vals = []
        for _, stream, key in metrics:
            r = next((r for r in rows if r["target"] == t and r["stream"] == stream
                      and r["concurrency"] == lo), None)
            vals.append(r.get(key) or 0.0 if r else 0.0)
        ax1.bar([m + i * width for m in range(len(metrics))], vals, width, label=t,
                color=COLORS.get(t))
    ax1.set_xticks([m + width * (len(targets) - 1) / 2 for m in range(len(metrics))])
    ax1.set_xticklabels([m[0] for m in metrics])
    ax1.set_ylabel("added latency vs direct (ms)")
    ax1.set_yscale("symlog", linthresh=1.0)
    ax1.set_title(f"added latency, concurrency {lo}")
    ax1.legend()
    everyone = ["direct", *targets]
    width = 0.8 / len(everyone)
    for i, t in enumerate(everyone):
        vals = []
        for stream in (False, True):
            r = next((r for r in rows if r["target"] == t and r["stream"] == stream
                      and r["concurrency"] == hi), None)
            vals.append(r["rps"] if r else 0.0)
        ax2.bar([m + i * width for m in range(2)], vals, width, label=t, color=COLORS.get(t))
    ax2.set_xticks([m + width * (len(everyone) - 1) / 2 for m in range(2)])
    ax2.set_xticklabels(["non-streaming", "streaming"])
    ax2.set_ylabel("requests/s")
    ax2.set_title(f"throughput, concurrency {hi}")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
