"""Usage records: one JSON object per finished generation request, for chargeback and audit.

A record holds who (tenant, the client's `user`, a bounded `metadata`), what (model asked,
model that answered, adapter, backend, worker, status), how much (prompt, completion and
cached tokens, the cost from the answering model's `price`, KV bytes reserved and at peak)
and how long (queue and total seconds), and what the policies did (degraded from, trimmed
tokens). Never a key, a prompt or an answer's text: any of the gateway's own keys in the
client's `user`, metadata keys or values, or request id is written as "[redacted]" (the whole
value when it is a key, with or without a Bearer scheme in any case; else the key's word in
it: gateway/tenants.py's redact_keys). A record is written whatever the request carried: a
string that is not valid Unicode is written with U+FFFD in place of what cannot be encoded.

`server.usage_log` is the file, as JSON lines. With `gateway serve --workers N` each worker
writes its own file (`usage.jsonl` -> `usage.<pid>.jsonl`), so no two processes append to one
file. A file past `usage_log_max_bytes` is rotated to `PATH.1` (`PATH.1` to `PATH.2`, ...,
keeping `usage_log_backups`). Records are buffered and written once a second (and at
shutdown), off the request path. With `telemetry.otlp_usage_logs` each record is also an
OTLP log record (event `gateway.usage`). `gateway usage PATH` sums them (gateway/usage_report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from gateway.core.config import Price
from gateway.core.context import RequestContext
from gateway.metrics import RequestObservation
from gateway.tenants import redact_keys

log = logging.getLogger("gateway.usage")

MAX_METADATA_KEYS = 16  # OpenAI's own bounds on `metadata`
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_USER = 256
MAX_REQUEST_ID = 128
MAX_KEY = 1024  # longer than any API key: a key that starts before a cut ends before this
FLUSH_BYTES = 64 * 1024
FLUSH_INTERVAL_S = 1.0


def usage_metadata(raw: object) -> dict[str, str] | None:
    """The client's `metadata`, bounded as OpenAI bounds it (16 string pairs, keys up to 64
    characters, values up to 512): what is beyond is left out of the record, never an error
    here (validation decides what a request may send)."""
    if not isinstance(raw, dict) or not raw:
        return None
    out: dict[str, str] = {}
    for key, value in raw.items():
        if len(out) == MAX_METADATA_KEYS:
            break
        if (isinstance(key, str) and isinstance(value, str) and len(key) <= MAX_METADATA_KEY
                and len(value) <= MAX_METADATA_VALUE):
            out[key] = value
    return out or None


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(value: str) -> str:
    """`value` as valid Unicode: a lone surrogate (JSON's \\ud800 escapes carry them) becomes
    U+FFFD, so that nothing a client sends can stop its record being encoded."""
    return value if value.isascii() else _SURROGATE.sub("\ufffd", value)


def _scrubbed(value: Any) -> Any:
    """A record made encodable whatever it holds: strings cleaned, keys as strings, anything
    JSON has no form for as its str()."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
        return str(value)  # past what JSON readers take as a number
    if value is None or isinstance(value, bool | int | float):
        return value
    return clean_text(str(value))


def worker_path(path: str, per_worker: bool, pid: int | None = None) -> Path:
    """The file this process writes: `path` itself, or with `--workers N` `<stem>.<pid><suffix>`."""
    p = Path(path)
    if not per_worker:
        return p
    return p.with_name(f"{p.stem}.{pid if pid is not None else os.getpid()}{p.suffix}")


class UsageLog:
    """Appends records as JSON lines to one file, rotated by size. Not thread-safe: the event
    loop's (write and flush run on it; the file writes are a few kB a second)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.written = 0  # records written to the file so far
        self._task: asyncio.Task[None] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        try:
            line = orjson.dumps(record) + b"\n"
        except TypeError:  # orjson.JSONEncodeError too: a record is written whatever it holds
            line = orjson.dumps(_scrubbed(record)) + b"\n"
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        count = len(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(data) > self.max_bytes:
                self._rotate()
            with open(self.path, "ab") as f:
                f.write(data)
            self.written += count
        except OSError as exc:
            log.error("writing %d usage records to %s failed: %s", count, self.path, exc.strerror)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()


class UsageSinks:
    """Where records go: the usage log file and/or the OTLP logs exporter; `is_key` tells a
    value that is one of the gateway's keys (redacted wherever a client's text is recorded)."""

    def __init__(self, file: UsageLog | None, otlp: Any | None = None) -> None:
        self.file = file
        self.otlp = otlp  # an OpenTelemetry SDK Logger, or None
        self.is_key: Callable[[str], bool] = lambda value: False

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.otlp is not None

    def redact(self, value: str | None, limit: int) -> str | None:
        """A client's string for a record: valid Unicode, every key in it redacted (before it
        is cut to `limit`, so no part of a key is left; what is past a key's length beyond the
        limit is cut first, so the work is bounded)."""
        if value is None:
            return None
        return redact_keys(clean_text(value[:limit + MAX_KEY]), self.is_key)[:limit]

    def emit(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(record)
        if self.otlp is not None:
            attrs = {k: v for k, v in record.items() if v is not None and k != "metadata"}
            for k, v in (record.get("metadata") or {}).items():
                attrs[f"metadata.{k}"] = v
            self.otlp.emit(body="gateway.usage", event_name="gateway.usage",
                           attributes=attrs, timestamp=int(record["time"] * 1e9))

    def start(self) -> None:
        if self.file is not None:
            self.file.start()

    async def aclose(self) -> None:
        if self.file is not None:
            await self.file.aclose()


def usage_record(obs: RequestObservation, ctx: RequestContext | None, request_id: str,
                 worker: int, price: Price | None, sinks: UsageSinks) -> dict[str, Any]:
    """One finished request's record, from what its metrics observed (so the records of a
    run sum to the Prometheus counters) and its context (None: it ended before one existed,
    e.g. a 401)."""
    known = ctx is not None
    cached = 0
    if ctx is not None and ctx.usage is not None:
        cached = int(getattr(ctx.usage, "cached_tokens", 0) or 0)  # where a backend reports it
    prompt, completion = obs.prompt_tokens, obs.completion_tokens
    return {
        "time": round(time.time(), 6),
        "request_id": sinks.redact(request_id, MAX_REQUEST_ID),  # a client's x-request-id
        "tenant": obs.tenant if known else None,
        "user": sinks.redact(ctx.user, MAX_USER) if ctx is not None else None,
        "metadata": _redacted(ctx.metadata, sinks) if ctx is not None else None,
        "model": obs.model if known else None,
        "served_model": ctx.target_model if ctx is not None else None,
        "adapter": ctx.adapter if ctx is not None else None,
        "backend": obs.backend if known else None,
        "worker": worker,
        "status": int(obs.status),
        "stream": ctx.stream if ctx is not None else None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "total_tokens": prompt + completion,
        "cost": round(price.cost(prompt, completion, cached), 9) if price is not None else None,
        "kv_bytes_reserved": obs.kv_bytes_reserved,
        "kv_bytes_peak": obs.kv_bytes_peak,
        "queue_s": _seconds(obs.gateway_queue_seconds),
        "backend_queue_s": _seconds(obs.backend_queue_seconds),
        "ttft_s": _seconds(obs.ttft),
        "duration_s": _seconds(obs.duration),
        "degraded_from": ctx.degraded_from if ctx is not None else None,
        "trimmed_tokens": ctx.trimmed_tokens if ctx is not None else 0,
        "rollout": ctx.rollout if ctx is not None else None,  # primary | candidate
    }


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _redacted(metadata: dict[str, str] | None, sinks: UsageSinks) -> dict[str, str] | None:
    """Names and values redacted alike (a name can be a key: the admin key leaked so); two
    names redacted to one stay two entries."""
    if not metadata:
        return None
    out: dict[str, str] = {}
    for k, v in metadata.items():
        name = sinks.redact(k, MAX_METADATA_KEY) or ""
        if name in out:
            name = f"{name}#{len(out)}"
        out[name] = sinks.redact(v, MAX_METADATA_VALUE) or ""
    return out
