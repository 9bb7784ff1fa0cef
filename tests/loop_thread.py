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

    def run() -> None:
        asyncio.set_event_loop(loop)
        srv = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", port, **server))
        ready.set()
        loop.run_forever()
        srv.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
