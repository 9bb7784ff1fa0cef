"""An asyncio load generator (aiohttp client): a bounded batch of chat completions at a fixed
concurrency, with per-request latency and, for streams, time to the first content event."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROMPT = [{"role": "user", "content": "Say hello in six words."}]


@dataclass
class Samples:
    """Seconds per successful request; `ttft` only for streams."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    last_error: str = ""
    cpu_s: float | None = None  # the server's CPU seconds over the batch (None: not ours)

    def extend(self, other: Samples) -> None:
        if other.cpu_s is not None:
            self.cpu_s = (self.cpu_s or 0.0) + other.cpu_s
        self.latency += other.latency
        self.ttft += other.ttft
        self.errors += other.errors
        self.elapsed += other.elapsed
        self.last_error = other.last_error or self.last_error


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {"model": model, "messages": PROMPT, "max_tokens": 16,
                               "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _has_text(part: bytes) -> bool:
    """A non-empty `"content":"..."` delta in this piece of the stream (the first token)."""
    at = part.find(b'"content":"')
    while at >= 0:
        if part[at + 11:at + 12] not in (b'"', b""):
            return True
        at = part.find(b'"content":"', at + 1)
    return False


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               stream: bool, out: Samples) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                out.errors += 1
                out.last_error = f"{resp.status}: {(await resp.read())[:200]!r}"
                return
            if not stream:
                data = await resp.read()
                if b'"choices"' not in data:
                    raise ValueError(f"no choices in {data[:200]!r}")
                out.latency.append(time.perf_counter() - t0)
                return
            first: float | None = None
            tail = b""
            async for part in resp.content.iter_any():
                if first is None and _has_text(part):
                    first = time.perf_counter()
                tail = (tail + part)[-64:]
            if b"[DONE]" not in tail:
                raise ValueError(f"stream ended without [DONE]: {tail!r}")
            end = time.perf_counter()
            out.latency.append(end - t0)
            out.ttft.append((first or end) - t0)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        out.errors += 1
        out.last_error = f"{type(exc).__name__}: {exc}"


async def run_batch(session: aiohttp.ClientSession, url: str, model: str, key: str | None,
                    stream: bool, concurrency: int, count: int, seconds: float) -> Samples:
    """`count` requests (or until `seconds` pass), `concurrency` at a time."""
    body = request_body(model, stream)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    out = Samples()
    left = count
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            await _one(session, url, body, headers, stream, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.elapsed = time.perf_counter() - t0
    return out


def new_session(concurrency: int) -> aiohttp.ClientSession:
    """Keep-alive connections, dropped by this side after 3 s idle: every server measured
    closes them after 5 s (uvicorn's default, memgate's keep_alive_timeout_s), and a batch
    that reuses one at the moment its server closes it fails with "Can not write request
    body" (seen when the other targets' batches took ~5 s between two of one target's)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=False, keepalive_timeout=3.0),
        timeout=aiohttp.ClientTimeout(total=60))


def loop_factory() -> Any:
    """uvloop's event loop where installed (what the gateway runs on), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return None
