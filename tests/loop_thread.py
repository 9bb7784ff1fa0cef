"""A loopback asyncio server on its own event loop in a daemon thread, beside a test (the fake
upstreams and the forward proxy the tests talk to through a real gateway process)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.contextmanager
def serving_in_thread(handler: Handler, port: int, **server: Any) -> Iterator[None]:
    """`asyncio.start_server(handler, "127.0.0.1", port, **server)` until the block ends; the
    connections still open then are cancelled quietly."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:  # the block ended with the connection still open
            writer.close()

    def run() -> None:
        asyncio.set_event_loop(loop)
        srv = loop.run_until_complete(asyncio.start_server(quiet, "127.0.0.1", port, **server))
        ready.set()
        loop.run_forever()
        srv.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
