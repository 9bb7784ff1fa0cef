"""`gateway usage PATH... --by tenant --since 1h`: sums of the usage records (gateway/usage.py).

PATH is a usage log as configured (`server.usage_log`): the file itself, the per-worker files
beside it (`usage.<pid>.jsonl`) and the rotated ones (`usage.jsonl.1`, ...) are all read; or
a directory, whose `*.jsonl*` files are read. Each group gets: requests, errors (status >= 400),
prompt / completion / cached tokens, cost (where the model has a price), and the KV bytes
reserved. A line that is not a record (a torn last line of a crashed worker) is counted and
skipped, never fatal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

GROUPS = ("tenant", "model", "served_model", "adapter", "backend", "user", "status", "worker",
          "day", "hour")
SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost",
        "kv_bytes_reserved")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """Bad arguments or unreadable paths; the message says which."""


def since_seconds(text: str) -> float:
    m = _DURATION.match(text.strip())
    if m is None:
        raise UsageError(f"--since {text!r}: expected a duration such as 90s, 30m, 1h, 7d")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def files(paths: list[str]) -> list[Path]:
    """Every file a usage log PATH stands for (see the module docstring), each once."""
    out: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.glob("*.jsonl*")):
                out[f] = None
            continue
        found = [p] if p.is_file() else []
        if p.parent.is_dir():
            stem, suffix = p.stem, p.suffix
            pattern = re.compile(
                rf"^{re.escape(p.name)}\.\d+$|^{re.escape(stem)}\.\d+{re.escape(suffix)}(\.\d+)?$")
            found += sorted(f for f in p.parent.iterdir() if pattern.match(f.name))
        if not found:
            raise UsageError(f"{raw}: no usage log here")
        for f in found:
            out[f] = None
    return list(out)


def records(paths: list[Path], skipped: list[int]) -> Iterator[dict[str, Any]]:
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                skipped[0] += 1
                continue
            if isinstance(rec, dict):
                yield rec
            else:
                skipped[0] += 1


def _key(rec: dict[str, Any], by: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for name in by:
        if name in ("day", "hour"):
            fmt = "%Y-%m-%d" if name == "day" else "%Y-%m-%dT%H:00Z"
            out.append(time.strftime(fmt, time.gmtime(float(rec.get("time") or 0))))
        else:
            value = rec.get(name)
            out.append("-" if value is None else str(value))
    return tuple(out)


def summarize(recs: Iterator[dict[str, Any]], by: tuple[str, ...], since: float | None,
              now: float | None = None) -> dict[tuple[str, ...], dict[str, float]]:
    cutoff = None if since is None else (now if now is not None else time.time()) - since
    groups: dict[tuple[str, ...], dict[str, float]] = {}
    for rec in recs:
        if cutoff is not None and float(rec.get("time") or 0) < cutoff:
            continue
        if rec.get("shadow"):  # a rollout's shadow copy: nobody's usage (gateway/rollout/)
            continue
        g = groups.setdefault(_key(rec, by), dict.fromkeys(SUMS, 0.0))
        g["requests"] += 1
        g["errors"] += int(rec.get("status") or 0) >= 400
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "cost",
                     "kv_bytes_reserved"):
            g[name] += float(rec.get(name) or 0)
    return dict(sorted(groups.items()))


def period_since(period: str, now: float | None = None) -> float:
    """`--period day|week|month`: seconds since the current calendar period (UTC, weeks from
    Monday) began, the period a tenant's `limits.budget` counts."""
    from policies.budget import period_bounds

    if period not in ("day", "week", "month"):
        raise UsageError(f"--period {period!r}: expected day, week or month")
    now = time.time() if now is None else now
    return now - period_bounds(period, now)[0]


def report(paths: list[str], by: str, since: str | None, as_json: bool = False,
           period: str | None = None) -> str:
    fields = tuple(f.strip() for f in by.split(",") if f.strip())
    unknown = [f for f in fields if f not in GROUPS]
    if not fields or unknown:
        raise UsageError(f"--by {by!r}: group by any of {', '.join(GROUPS)}")
    skipped = [0]
    sums = summarize(records(files(paths), skipped), fields,
                     since_seconds(since) if since else period_since(period) if period else None)
    rows = [{**dict(zip(fields, key, strict=True)), **_ints(v)} for key, v in sums.items()]
    if as_json:
        return orjson.dumps({"groups": rows, "skipped_lines": skipped[0]},
                            option=orjson.OPT_INDENT_2).decode()
    header = [*fields, *SUMS]
    table = [header] + [[_cell(r[h]) for h in header] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < len(fields) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    if skipped[0]:
        lines.append(f"({skipped[0]} lines were not records and were skipped)")
    return "\n".join(lines)


def _ints(v: dict[str, float]) -> dict[str, float | int]:
    return {k: round(x, 6) if k == "cost" else int(x) for k, x in v.items()}


def _cell(value: object) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
