"""A hostile tenant as its own process (as one would be: another client, not a thread of the
test's process sharing its GIL): sends the isolation issue's classes in turn, one at a time,
each as soon as the last was answered, until SIGTERM; writes one status a line to OUT (-1:
no answer). python -m tests.e2e.security.hostile_sender BASE OUT [CLASSES]"""

from __future__ import annotations

import signal
import sys
from typing import Any

import httpx

from tests.e2e.security.test_hostile_neighbour import encode, hostile_bodies


def main(base: str, out: str) -> None:
    bodies = [(path, encode(body)) for path, body in hostile_bodies()]
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    headers = {"authorization": "Bearer sk-demo-acme", "content-type": "application/json"}
    with httpx.Client(timeout=60) as client, open(out, "a", buffering=1) as log:
        i = 0
        while not stopping:
            path, content = bodies[i % len(bodies)]
            try:
                status = client.post(f"{base}{path}", content=content, headers=headers).status_code
            except httpx.HTTPError:
                status = -1
            log.write(f"{status}\n")
            i += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
