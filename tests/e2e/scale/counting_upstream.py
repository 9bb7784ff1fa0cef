"""A vLLM-like upstream on loopback that counts what reaches it: requests in flight (now and
at most), in total, per adapter; it serves vLLM's /metrics (a KV cache of a given size), the
adapter load/unload routes, and records every header it saw. Answers wait at a gate the test
opens, so that "in flight" is what the test decides, not how fast this machine is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

from tests.loop_thread import serving_in_thread
from tests.server import free_port

KV_BYTES = 16 * 2**20
KV_TOKENS = 16384  # 1 KiB per token
BASE = "base"


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class CountingUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.received = 0
        self.headers: list[dict[str, str]] = []
        self.loaded: set[str] = set()
        self.adapter_in_flight: dict[str, int] = {}
        self.unloaded_in_use: list[str] = []  # adapters unloaded while a request used them
        self.loads = 0
        self.max_loaded = 0
        self._open = threading.Event()
        self._open.set()

    # ---- what the test controls ---------------------------------------------------------

    def hold(self) -> None:
        """Answers wait from now on until release()."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def reset_counts(self) -> None:
        with self._lock:
            self.max_in_flight = self.in_flight
            self.received = 0

    # ---- the server ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v for k, v in
                       (line.split(": ", 1) for line in lines[1:] if ": " in line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            data: dict[str, Any] = json.loads(body) if body else {}
            if path.endswith("/metrics"):
                self._send(writer, 200, "text/plain", self._metrics().encode())
            elif path.endswith("/models"):
                self._json(writer, {"object": "list", "data": [{"id": BASE, "object": "model"}]})
            elif path.endswith("/load_lora_adapter"):
                with self._lock:
                    self.loaded.add(data["lora_name"])
                    self.loads += 1
                    self.max_loaded = max(self.max_loaded, len(self.loaded))
                self._send(writer, 200, "text/plain", b"ok")
            elif path.endswith("/unload_lora_adapter"):
                with self._lock:
                    name = data["lora_name"]
                    if self.adapter_in_flight.get(name):
                        self.unloaded_in_use.append(name)
                    self.loaded.discard(name)
                self._send(writer, 200, "text/plain", b"ok")
            elif method == "POST":
                await self._generate(writer, headers, data)
            else:
                self._send(writer, 404, "application/json", b'{"error": {"message": "no"}}')
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _metrics(self) -> str:
        return (f'vllm:cache_config_info{{block_size="16",kv_cache_memory_bytes="{KV_BYTES}",'
                f'kv_cache_size_tokens="{KV_TOKENS}"}} 1.0\n'
                f"vllm:kv_cache_usage_perc 0.0\n"
                f"vllm:num_requests_running {self.in_flight}\nvllm:num_requests_waiting 0\n")

    async def _generate(self, w: asyncio.StreamWriter, headers: dict[str, str],
                        data: dict[str, Any]) -> None:
        model = str(data.get("model", BASE))
        with self._lock:
            self.received += 1
            self.headers.append(headers)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.adapter_in_flight[model] = self.adapter_in_flight.get(model, 0) + 1
            if model != BASE and model not in self.loaded:
                self.unloaded_in_use.append(f"{model} (never loaded)")
        try:
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            if data.get("stream"):  # the first event at once, the rest through the gate
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model}
                w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"connection: close\r\n\r\n"
                        + _event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]}))
                await w.drain()
                await self._gate()
                w.write(_event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                        + _event({**chunk, "choices": [], "usage": usage}) + b"data: [DONE]\n\n")
            else:
                await self._gate()
                self._json(w, {"id": "c", "object": "chat.completion", "created": 0, "model": model,
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                            "finish_reason": "stop"}], "usage": usage})
            await w.drain()
        finally:
            with self._lock:
                self.in_flight -= 1
                self.adapter_in_flight[model] -= 1

    async def _gate(self) -> None:
        while not self._open.is_set():
            await asyncio.sleep(0.01)

    @staticmethod
    def _send(w: asyncio.StreamWriter, status: int, ctype: str, body: bytes) -> None:
        w.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n".encode() + body)

    def _json(self, w: asyncio.StreamWriter, payload: object) -> None:
        self._send(w, 200, "application/json", json.dumps(payload).encode())

    @contextlib.contextmanager
    def running(self) -> Iterator[CountingUpstream]:
        with serving_in_thread(self._handle, self.port, backlog=512):
            yield self
