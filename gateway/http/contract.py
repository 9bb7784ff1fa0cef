"""What gateway/http/ and the generation handler (gateway/handler.py) agree on: the routes
the handler answers, a request as far as its head (`Incoming`), how an answer goes out (a
`ResponseWriter`: the fast writer's or the ASGI writer's) and the `Handler` they are handed
when the app is built. gateway/http/ imports this module, never the handler itself."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import orjson

from gateway import validation
from gateway.core.errors import GatewayError
from gateway.sse import DONE

log = logging.getLogger("gateway.http")

# The generation routes, declared once: path -> kind.
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
                     "/v1/responses": "responses", "/v1/embeddings": "embeddings"}

INTERNAL_ERROR = orjson.dumps(GatewayError("The gateway failed to handle this request.").body())


class Media(Enum):
    JSON = "application/json"
    SSE = "text/event-stream"


# What both writers put in every answer's head: the content type by media, and for a stream
# the headers that keep proxies from buffering it.
CONTENT_TYPE = {Media.JSON: "application/json", Media.SSE: "text/event-stream; charset=utf-8"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ResponseWriter(Protocol):
    """How one request's answer goes out: once (`respond`), or as server-sent events."""

    gone: bool  # the client went away (and the writer cancelled the handler's task)

    @property
    def started(self) -> bool:
        """Something of the answer went out already."""

    async def read_body(self, limit: int, timeout_s: float) -> bytes | bytearray:
        """The whole body, within `limit` bytes (413) and `timeout_s` seconds (408)."""

    async def respond(self, status: int, media: Media, headers: dict[str, str], body: bytes) -> None:
        """The whole answer. Past a stream's start it cuts the connection instead."""

    async def stream(self, headers: dict[str, str], events: AsyncGenerator[bytes, None]) -> None:
        """200 with server-sent events, until the last one (which ends with [DONE]); closes
        `events` whatever happens."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as far as its head: the route's kind, and the raw headers (lower-case names)."""

    kind: str
    method: str
    path: str
    headers: Sequence[tuple[bytes, bytes]]


class Handler(Protocol):
    """Answers one generation request through its writer (gateway/handler.py)."""

    async def handle(self, req: Incoming, out: ResponseWriter) -> None: ...

    @property
    def header_timeout_s(self) -> float:
        """How long a request head may take on the config served now (server.header_timeout_s)."""


# ---------------------------------------------------------------- steps both writers share


def clean_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The answer's headers to send: a value with a control character (never expected: every
    value comes from config or from numbers) is left out rather than split the head."""
    out = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\x00" in value:
            log.warning("dropping response header %s with a control character", name)
            continue
        out.append((name, value))
    return out


def check_body_size(size: int, limit: int) -> None:
    """A body past `limit` bytes, while it is still arriving or once whole: 413."""
    if size > limit:
        raise validation.too_large(limit)


async def sse_frames(
    events: AsyncGenerator[bytes, None],
) -> AsyncGenerator[tuple[bytes, bool], None]:
    """A stream's events with whether each is the last (it ends with [DONE]); a source that
    ends without [DONE] (after an error event) gets an empty last frame. Closes `events`
    whatever happens, the writer's own failure included."""
    try:
        async for event in events:
            last = event.endswith(DONE)
            yield event, last
            if last:
                return
        yield b"", True
    finally:
        await events.aclose()
