"""`gateway serve` whose `openai` kind generates through aiohttp (bench/overhead/aiohttp_upstream.py)
instead of memgate's own pool: one worker, for the side-by-side client choice."""

from __future__ import annotations

import sys

from backends import openai as openai_kind
from bench.overhead.aiohttp_upstream import AiohttpUpstream
from gateway.cli import main

openai_kind.UpstreamHTTP = AiohttpUpstream  # type: ignore[misc,assignment]

if __name__ == "__main__":
    sys.exit(main())
