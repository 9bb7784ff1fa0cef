"""The ASGI writer: the generation routes under any ASGI server, and under `gateway serve` for
what its fast writer does not take (a query string, percent-escapes, a root_path).

GenerationDispatch is the app's outermost layer: a request for a generation route (any
method: the handler answers 405 itself) goes to gateway/handler.py with an ASGIWriter; every
other request goes on to the rest of the app. The writer reads the body from `receive`, then
watches it for the client going away (which cancels the request's task, as the fast
writer's connection_lost does), and sends the answer as ASGI messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import validation
from gateway.core.errors import ClientDisconnected
from gateway.http.contract import (
    CONTENT_TYPE,
    GENERATION_ROUTES,
    SSE_HEADERS,
    Handler,
    Incoming,
    Media,
    check_body_size,
    clean_headers,
    sse_frames,
)


def _head(media: Media, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The content type, then `headers` (clean_headers: the same as the fast writer's)."""
    return [(b"content-type", CONTENT_TYPE[media].encode()),
            *((k.encode("latin-1"), v.encode("latin-1", "replace"))
              for k, v in clean_headers(headers))]


class ASGIWriter:
    """One request's answer as ASGI messages (a ResponseWriter, gateway/handler.py)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None
        self._done = False
        self.started = False
        self.gone = False

    async def read_body(self, limit: int, timeout_s: float) -> bytearray:
        body = bytearray()
        try:
            async with asyncio.timeout(timeout_s):  # a slow sender must not hold a worker
                while True:
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected("The client closed the connection.")
                    body += message.get("body", b"")
                    check_body_size(len(body), limit)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise validation.body_timeout(timeout_s) from None
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return body

    async def _watch(self) -> None:
        """Cancel the request's task when the client goes away before the answer is done."""
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._done and self._task is not None:
            self.gone = True
            self._task.cancel()

    async def respond(self, status: int, media: Media, headers: dict[str, str], body: bytes) -> None:
        if self.gone or self._done:
            return
        if self.started:  # past a stream's head there is no other answer: cut it
            raise ClientDisconnected("The answer could not be completed.")
        self.started = True
        head = _head(media, headers)
        head.append((b"content-length", b"%d" % len(body)))
        self._done = True
        await self._send({"type": "http.response.start", "status": status, "headers": head})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def stream(self, headers: dict[str, str], events: AsyncGenerator[bytes, None]) -> None:
        async with contextlib.aclosing(sse_frames(events)) as frames:
            self.started = True
            head = _head(Media.SSE, {**SSE_HEADERS, **headers})
            await self._send({"type": "http.response.start", "status": 200, "headers": head})
            async for event, last in frames:
                self._done = last
                await self._send({"type": "http.response.body", "body": event, "more_body": not last})

    def close(self) -> None:
        self._done = True
        if self._watcher is not None:
            self._watcher.cancel()


class GenerationDispatch:
    """Outermost ASGI layer: generation routes to the handler, the rest to `app`."""

    def __init__(self, app: ASGIApp, handler: Handler) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            kind = GENERATION_ROUTES.get(path)
            if kind is not None:
                out = ASGIWriter(receive, send)
                try:
                    await self.handler.handle(Incoming(kind, scope["method"], path,
                                                       scope["headers"]), out)
                finally:
                    out.close()
                return
        await self.app(scope, receive, send)
