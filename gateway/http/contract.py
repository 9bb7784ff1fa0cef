"""What gateway/http/ and the generation handler (gateway/handler.py) agree on: the routes
the handler answers, a request as far as its head (`Incoming`), how an answer goes out (a
`ResponseWriter`: the fast writer's or the ASGI writer's) and the `Handler` they are handed
when the app is built. gateway/http/ imports this module, never the handler itself."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import orjson

from gateway.core.errors import GatewayError

# The generation routes, declared once: path -> kind.
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
                     "/v1/responses": "responses", "/v1/embeddings": "embeddings"}

INTERNAL_ERROR = orjson.dumps(GatewayError("The gateway failed to handle this request.").body())


class Media(Enum):
    JSON = "application/json"
    SSE = "text/event-stream"


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
