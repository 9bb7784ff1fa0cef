"""In-process fakes for the generation handler's tests (no sockets, no subprocess, no torch).

- RecordingWriter: a ResponseWriter (gateway/handler.py) that records the answer (status,
  headers, body) or the streamed events, and can play a body over the limit, a body that never
  finishes (408), and a client that goes away (which cancels the handler's task, as the fast
  and ASGI writers do).
- ScriptedBackend: a Backend (gateway/core/backend.py) that yields a scripted list of chunks,
  raises a scripted error before or after the first one, or holds mid-stream until released;
  with `vocab_size` it reads the request's fields as the local engine does
  (backends/local/request.py, called where LocalBackend calls it: counting and generating).
- running(): create_app over those backends with its lifespan entered; yields the state and
  the handler the app serves with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson

from backends.local import request as local_request
from gateway import validation
from gateway.app import create_app
from gateway.core.backend import BackendStats, Capacity, MemorySnapshot
from gateway.core.context import Chunk, RequestContext, Usage
from gateway.handler import GenerationHandler
from gateway.http.contract import Incoming, Media
from gateway.settings import Settings, parse_settings
from gateway.sse import DONE
from gateway.state import GatewayState

ACME_KEY = "sk-demo-acme"
GLOBEX_KEY = "sk-demo-globex"
DEMO_VOCAB = 2048  # models/demo's vocab_size (backends/local/commands/demo.py)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(tmp_path: Path, **server: Any) -> dict[str, Any]:
    """The e2e demo config's shape (gateway/launch.py demo_config: tenants, adapters, a 64 KiB
    body limit) over an `openai` backend entry that running() replaces by a fake."""
    return {
        "server": {
            "admin_api_key_env": "GATEWAY_ADMIN_KEY",
            "max_body_bytes": "64KiB",
            "usage_log": str(tmp_path / "usage.jsonl"),
            **server,
        },
        "backends": {"local": {"kind": "openai", "url": "http://127.0.0.1:9/v1"}},
        "models": [{"name": "demo", "backend": "local"}],
        "tenants": [
            {
                "name": "acme",
                "api_key_sha256": [sha(ACME_KEY)],
                "models": ["demo"],
                "adapters": {"demo": "acme-support"},
            },
            {
                "name": "globex",
                "api_key_sha256": [sha(GLOBEX_KEY)],
                "models": ["demo"],
                "adapters": {"demo": "globex-legal"},
            },
        ],
    }


# ---- the writer ---------------------------------------------------------------------------


class RecordingWriter:
    """A ResponseWriter that records what the handler answers.

    `body`: the request body, in one part or several (read in order, checked against the
    limit after each, as the ASGI writer does). `stall`: the rest of the body never comes
    (read_body times out: 408). `leave_after`: the client goes away once that many events
    were written (a stream) or right after the body was read (0, any answer). leave() is the
    connection closing: the request's task is cancelled unless the answer is complete.
    """

    def __init__(
        self,
        body: bytes | Sequence[bytes] = b"",
        *,
        stall: bool = False,
        leave_after: int | None = None,
    ) -> None:
        self.parts = [body] if isinstance(body, bytes | bytearray) else list(body)
        self.stall = stall
        self.leave_after = leave_after
        self.gone = False
        self._started = False
        self.complete = False
        self.cut = False  # respond() after a stream's head: the connection was cut
        self.status: int | None = None
        self.media: Media | None = None
        self.headers: dict[str, str] = {}
        self.body: bytes | None = None
        self.events: list[bytes] = []
        self.reads = 0
        self.task: asyncio.Task[Any] | None = None

    @property
    def started(self) -> bool:
        return self._started

    async def read_body(self, limit: int, timeout_s: float) -> bytes | bytearray:
        self.task = asyncio.current_task()
        self.reads += 1
        body = bytearray()
        try:
            async with asyncio.timeout(timeout_s):
                for part in self.parts:
                    await asyncio.sleep(0)  # each part its own arrival
                    body += part
                    if len(body) > limit:
                        raise validation.too_large(limit)
                if self.stall:
                    await asyncio.Event().wait()  # the sender never sends the rest
        except TimeoutError:
            raise validation.body_timeout(timeout_s) from None
        if self.leave_after == 0:
            asyncio.get_running_loop().call_soon(self.leave)
        return body

    def leave(self) -> None:
        """The client closes the connection (the fast writer's connection_lost)."""
        if not self.complete and not self.gone and self.task is not None:
            self.gone = True
            self.task.cancel()

    async def respond(
        self, status: int, media: Media, headers: dict[str, str], body: bytes
    ) -> None:
        if self.gone or self.complete:
            return
        if self._started:  # past a stream's head there is no other answer: cut it
            self.cut = True
            self.complete = True
            return
        self._started = True
        self.status, self.media, self.headers, self.body = status, media, dict(headers), body
        self.complete = True

    async def stream(self, headers: dict[str, str], events: AsyncGenerator[bytes, None]) -> None:
        try:
            self._started = True
            self.status, self.media, self.headers = 200, Media.SSE, dict(headers)
            async for event in events:
                self.events.append(event)
                if event.endswith(DONE):
                    self.complete = True
                    return
                if self.leave_after is not None and len(self.events) >= self.leave_after:
                    asyncio.get_running_loop().call_soon(self.leave)
            self.complete = True  # ended without [DONE] (an error event)
        finally:
            await events.aclose()

    # ---- reading what was answered ------------------------------------------------------

    def json(self) -> Any:
        assert self.body is not None, "no whole answer was written"
        return orjson.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error of the answer (exactly the four fields)."""
        body = self.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return dict(body["error"])

    def data(self) -> list[bytes]:
        """Each `data: ` payload of the stream, in order ([DONE] included)."""
        out = []
        for frame in b"".join(self.events).split(b"\n\n"):
            if frame:
                assert frame.startswith(b"data: "), frame
                out.append(frame[6:])
        return out


# ---- the backend --------------------------------------------------------------------------


@dataclass
class Hold:
    """Where a ScriptedBackend stops mid-stream: after `after` chunks, until released."""

    after: int
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class ScriptedBackend:
    """Plays `script` (Chunks in order; an exception at its place is raised there) for every
    request. Counts generations opened and closed (a generation's `finally` ran)."""

    Config: ClassVar[type[Any]] = dict
    name: str

    def __init__(
        self,
        name: str = "local",
        script: Sequence[Chunk | BaseException] = (),
        *,
        vocab_size: int | None = None,
        kv_bytes: int = 64 * 2048 * 16,
        window: int = 256,
        forwards: Sequence[str] = (),
        adapters: dict[str, int] | None = None,
        hold: Hold | None = None,
    ) -> None:
        self.name = name
        self.script = list(script) if script else [*text_chunks("Hello", " there"), last_chunk(2)]
        self.vocab_size = vocab_size
        self.kv_bytes = kv_bytes
        self.window = window
        self._forwards = set(forwards)
        self._adapters = (
            adapters if adapters is not None else {"acme-support": 1 << 20, "globex-legal": 1 << 20}
        )
        self.hold = hold
        self.opened = 0
        self.closed = 0
        self.contexts: list[RequestContext] = []

    async def start(self) -> None:
        return None

    def _fields(self, ctx: RequestContext) -> None:
        if self.vocab_size is not None:  # as LocalBackend._request
            local_request.read(ctx, ctx.target_model, self.vocab_size)

    def count_tokens(self, ctx: RequestContext) -> int | None:
        self._fields(ctx)
        if ctx.messages is not None:
            return sum(len(str(m.get("content")).split()) + 2 for m in ctx.messages)
        return len(str(ctx.prompt).split())

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        self._fields(ctx)
        self.opened += 1
        self.contexts.append(ctx)
        try:
            for i, step in enumerate(self.script):
                if self.hold is not None and i == self.hold.after:
                    self.hold.reached.set()
                    await self.hold.release.wait()
                if isinstance(step, BaseException):
                    raise step
                yield step
        finally:
            self.closed += 1

    def forwards(self, kind: str) -> bool:
        return kind in self._forwards

    def capacity(self) -> Capacity | None:
        return Capacity(
            kv_bytes_total=self.kv_bytes,
            kv_bytes_free=self.kv_bytes,
            bytes_per_token=2048,
            block_size=16,
            context_window=self.window,
        )

    def adapters(self) -> dict[str, int] | None:
        return self._adapters

    def memory(self) -> MemorySnapshot:
        return MemorySnapshot()

    def stats(self) -> BackendStats:
        return BackendStats()

    async def ensure_adapter(self, name: str) -> None:
        return None

    def available(self) -> bool:
        return True

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def text_chunks(*texts: str) -> list[Chunk]:
    return [Chunk(text=t) for t in texts]


def last_chunk(completion: int, prompt: int = 3, reason: str = "stop") -> Chunk:
    return Chunk(
        finish_reason=reason, usage=Usage(prompt_tokens=prompt, completion_tokens=completion)
    )


# ---- the app ------------------------------------------------------------------------------


@dataclass
class Gateway:
    state: GatewayState
    handler: GenerationHandler
    usage_path: Path

    async def call(
        self,
        body: Any = None,
        *,
        raw: bytes | Sequence[bytes] | None = None,
        key: str | None = ACME_KEY,
        path: str = "/v1/chat/completions",
        method: str = "POST",
        ctype: str | None = "application/json",
        headers: Sequence[tuple[bytes, bytes]] = (),
        writer: RecordingWriter | None = None,
    ) -> RecordingWriter:
        """One request through the handler, in its own task (as a server runs it): `body` sent
        as JSON, or `raw` bytes (in parts when a list)."""
        if raw is None:
            # as httpx's json= encodes it (integers past 64 bits too)
            raw = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        out = writer if writer is not None else RecordingWriter(raw)
        head = list(headers)
        if key is not None:
            head.append((b"authorization", f"Bearer {key}".encode()))
        if ctype is not None:
            head.append((b"content-type", ctype.encode()))
        kind = {
            "/v1/chat/completions": "chat",
            "/v1/completions": "completion",
            "/v1/responses": "responses",
            "/v1/embeddings": "embeddings",
        }[path]
        await asyncio.create_task(self.handler.handle(Incoming(kind, method, path, head), out))
        return out

    def usage_records(self) -> list[dict[str, Any]]:
        """The usage records written so far (flushed now)."""
        file = self.state.telemetry.usage.file
        assert file is not None
        file.flush()
        if not self.usage_path.exists():
            return []
        return [orjson.loads(line) for line in self.usage_path.read_bytes().splitlines()]

    @property
    def reserved(self) -> int:
        return self.state.policies.reservations.total_reserved()


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, *backends: ScriptedBackend, settings: Settings | None = None, **server: Any
) -> AsyncIterator[Gateway]:
    """create_app over `backends` (default: one ScriptedBackend named `local`), lifespan
    entered: the state is ready, its usage log at tmp_path/usage.jsonl."""
    settings = settings if settings is not None else parse_settings(config(tmp_path, **server))
    fakes = {b.name: b for b in (backends or (ScriptedBackend(),))}
    app = create_app(settings, backends=fakes)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        state: GatewayState = app.state.gateway
        yield Gateway(state, app.state.generation_handler, tmp_path / "usage.jsonl")
