"""`vllm` backend kind: a vLLM OpenAI server, with tenant adapters loaded at run time.

Generation goes through the `openai` kind's streaming client (the adapter is sent as the
model name, as vLLM serves LoRA modules). Around it this kind adds what vLLM needs:
- the tenant's adapter is loaded before dispatch (`POST /v1/load_lora_adapter`, vLLM started
  with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), once under concurrent
  requests, and the least recently used unpinned adapter is unloaded when the byte budget is
  full (`backends/remote_adapters.py`);
- capacity in bytes from vLLM's `/metrics` (`vllm:cache_config_info`,
  `vllm:kv_cache_usage_perc`, running/waiting) and the model's config.json;
- exact prompt token counts from the model's own tokenizer.json and chat template.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx

from backends.hf.config import ArchConfig
from backends.hf.safetensors import adapter_bytes
from backends.hf.tokenizer import ChatTokenizer, TokenizerError
from backends.openai import OpenAIBackend, OpenAIConfig
from backends.remote import adapter_name
from backends.remote_adapters import RemoteAdapters
from gateway.core import cpu
from gateway.core.backend import BackendStats, Capacity, MemorySnapshot
from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import BackendError
from gateway.core.kv import dtype_bytes, kv_bytes_per_token
from gateway.core.residency import AdapterResidency

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 2.0  # a refresh of the /metrics reading (the last one is kept meanwhile)
START_SCRAPE_TIMEOUT_S = 15.0  # the first reading, at start

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class VLLMConfig(OpenAIConfig):
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model_dir", "adapters_dir")

    url: str = "http://127.0.0.1:8001/v1"
    model_dir: str | None = None  # the checkpoint vLLM serves: config.json + tokenizer files
    adapters_dir: str | None = None  # PEFT adapters, one per subdirectory, as vLLM sees them
    adapter_budget_bytes: int = 64 * 2**20
    kv_budget_bytes: int | None = None  # admit against at most this much of vLLM's KV cache
    adapter_model: str | None = "{adapter}"  # vLLM serves each LoRA under its own name
    metrics_max_age: float = 0.5  # seconds a /metrics reading is reused


@dataclass(slots=True)
class VLLMReading:
    kv_bytes_total: int = 0
    kv_usage: float = 0.0
    block_size: int = 16
    kv_tokens: int = 0
    running: int = 0
    waiting: int = 0
    at: float = 0.0


def parse_metrics(text: str) -> VLLMReading:
    """The few vLLM metrics the gateway needs, from the Prometheus text format."""
    r = VLLMReading(at=time.monotonic())
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, value = m.group("name"), float(m.group("value"))
        if name == "vllm:kv_cache_usage_perc":
            r.kv_usage = value
        elif name == "vllm:num_requests_running":
            r.running += int(value)
        elif name == "vllm:num_requests_waiting":
            r.waiting += int(value)
        elif name == "vllm:cache_config_info":
            labels = dict(_LABEL.findall(m.group("labels") or ""))
            with contextlib.suppress(ValueError, KeyError):
                r.kv_bytes_total = int(float(labels["kv_cache_memory_bytes"]))
            with contextlib.suppress(ValueError, KeyError):
                r.block_size = int(labels["block_size"])
            with contextlib.suppress(ValueError, KeyError):
                r.kv_tokens = int(float(labels["kv_cache_size_tokens"]))
    return r


class VLLMBackend(OpenAIBackend):
    Config = VLLMConfig
    provider = "vllm"  # gen_ai.provider.name of its client spans

    def share_residency(self, residency: AdapterResidency) -> None:
        """With shared_state: the fleet decides which adapters this vLLM holds (SharesResidency)."""
        self.remote.share(residency, self.vcfg.url.rstrip("/"))

    def __init__(self, name: str, cfg: VLLMConfig) -> None:
        super().__init__(name, cfg)
        self.vcfg = cfg
        self._model: ArchConfig | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._reading = VLLMReading()
        self._refresh: asyncio.Task[bool] | None = None
        self._adapter_sizes: dict[str, int] = {}
        self._served: str | None = cfg.model
        self.remote = RemoteAdapters(cfg.adapter_budget_bytes, self._load, self._unload,
                                     self._adapter_sizes.get)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await super().start()
        if self.vcfg.model_dir:
            model_dir = Path(self.vcfg.model_dir)
            hf = json.loads((model_dir / "config.json").read_text())
            self._model = ArchConfig.from_hf(hf)
            self._tokenizer = await asyncio.to_thread(
                ChatTokenizer.from_dir, model_dir, self._model.eos_token_ids)
        if self.vcfg.adapters_dir:
            elem = dtype_bytes(self._model.dtype if self._model else "float32")
            for d in sorted(Path(self.vcfg.adapters_dir).iterdir()):
                if (d / "adapter_config.json").exists():
                    self._adapter_sizes[d.name] = adapter_bytes(d, elem)
        # The first reading may wait for a busy vLLM (the steady-state refresh gives up at 2 s
        # and keeps the last reading; at start there is none to keep).
        if not await self._scrape(START_SCRAPE_TIMEOUT_S):
            log.warning("vLLM %s: no /metrics reading at start; admitting against kv_budget_bytes "
                        "until one comes", self.name)
        self._served = self.vcfg.model or await self._base_model_name()

    async def _base_model_name(self) -> str | None:
        """The base model vLLM serves (the entry of /v1/models without a parent)."""
        if self._client is None:
            return None
        try:
            data = (await self._client.get("/models", timeout=5)).json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return None  # not up yet; requests then name the public model
        return next((m.get("id") for m in data if not m.get("parent")), None)

    def _body(self, ctx: RequestContext) -> dict[str, Any]:
        body = super()._body(ctx)
        model = self._served or ctx.target_model
        if self.cfg.adapter_model and ctx.adapter:
            model = adapter_name(self.cfg.adapter_model, model, ctx.adapter)
        body["model"] = model
        return body

    # ---- adapters --------------------------------------------------------------------------

    async def _admin_post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        if self._client is None:
            raise BackendError(f"backend {self.name} is not started", 503, "backend_not_ready")
        try:
            return await self._client.post(path, json=body, timeout=120)
        except httpx.HTTPError as exc:
            raise BackendError(f"vLLM {self.name} is unreachable ({type(exc).__name__})",
                               502, "upstream_unreachable") from None

    async def _load(self, name: str) -> None:
        adapter_dir = Path(self.vcfg.adapters_dir or ".") / name
        resp = await self._admin_post("/load_lora_adapter",
                                      {"lora_name": name, "lora_path": str(adapter_dir)})
        if resp.status_code == 400 and "already been loaded" in resp.text:
            return  # loaded before we started (or by another gateway): fine
        if resp.status_code >= 400:
            raise BackendError(f"vLLM refused to load adapter {name!r}: {resp.text[:300]}",
                               502, "adapter_load_failed")
        log.info("vLLM %s loaded adapter %s", self.name, name)

    async def _unload(self, name: str) -> None:
        resp = await self._admin_post("/unload_lora_adapter", {"lora_name": name})
        if resp.status_code >= 400 and resp.status_code != 404:
            log.warning("vLLM %s failed to unload %s: %s", self.name, name, resp.text[:200])
        else:
            log.info("vLLM %s unloaded adapter %s", self.name, name)

    async def ensure_adapter(self, name: str) -> None:
        await self.remote.acquire(name)
        await self.remote.release(name)

    def adapters(self) -> dict[str, int] | None:
        return dict(self._adapter_sizes)

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        adapter = ctx.adapter
        if adapter is not None:
            await self.remote.acquire(adapter)
            ctx.memory.adapter = adapter
            ctx.memory.adapter_bytes = self._adapter_sizes.get(adapter, 0)
        try:
            prompt = await cpu.count_prompt(ctx, self.count_tokens)  # the policies' count, if any
            if prompt is not None:
                # vLLM allocates KV as tokens arrive; this is the most the request can hold.
                ctx.memory.kv_bytes_reserved = self._bytes_per_token() * ctx.sampling.n * (
                    prompt + self._output_limit(ctx, prompt))
            stream = super().generate(ctx)
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        ctx.memory.kv_bytes_peak = self._bytes_per_token() * chunk.usage.total_tokens
                    yield chunk
            finally:
                await stream.aclose()
        finally:
            if adapter is not None:
                await self.remote.release(adapter)

    def _output_limit(self, ctx: RequestContext, prompt: int) -> int:
        """The most output tokens a sequence can take: its limit, else the context's end."""
        if ctx.sampling.max_tokens is not None:
            return ctx.sampling.max_tokens
        return max(0, self._model.context_window - prompt) if self._model is not None else 0

    def count_tokens(self, ctx: RequestContext) -> int | None:
        """Exact for a chat of text (with its tools) or a text prompt, as vLLM's own template
        renders it; None (an estimate then) for what the tokenizer here cannot render."""
        if self._tokenizer is None:
            return None
        try:
            if ctx.kind == "chat":
                tools = ctx.body.get("tools")
                return self._tokenizer.count_chat(ctx.messages or [],
                                                  tools if isinstance(tools, list) else None)
            if ctx.kind == "completion" and isinstance(ctx.prompt, str):
                return len(self._tokenizer.encode(ctx.prompt))
        except TokenizerError:
            return None
        return None

    # ---- capacity and memory ---------------------------------------------------------------

    async def _scrape(self, timeout: float = SCRAPE_TIMEOUT_S) -> bool:
        """A fresh reading of vLLM's /metrics; False (the last reading kept) if none came."""
        if self._client is None:
            return False
        root = self.vcfg.url.rstrip("/").removesuffix("/v1")
        try:
            resp = await self._client.get(f"{root}/metrics", timeout=timeout)
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        self._reading = parse_metrics(resp.text)
        return True

    def _fresh(self) -> VLLMReading:
        """The latest reading; schedules a refresh when it is older than metrics_max_age."""
        age = time.monotonic() - self._reading.at
        if age > self.vcfg.metrics_max_age and (self._refresh is None or self._refresh.done()):
            with contextlib.suppress(RuntimeError):  # no running loop: keep the old reading
                self._refresh = asyncio.get_running_loop().create_task(self._scrape())
        return self._reading

    def _bytes_per_token(self) -> int:
        r = self._reading
        if r.kv_bytes_total and r.kv_tokens:
            return r.kv_bytes_total // r.kv_tokens
        if self._model is not None:
            m = self._model
            return kv_bytes_per_token(
                m.num_hidden_layers, m.num_key_value_heads, m.head_dim, dtype_bytes(m.dtype))
        return 0

    def capacity(self) -> Capacity | None:
        r = self._fresh()
        if r.kv_bytes_total:
            total = min(r.kv_bytes_total, self.vcfg.kv_budget_bytes or r.kv_bytes_total)
            used = int(r.kv_bytes_total * r.kv_usage)
        elif self.vcfg.kv_budget_bytes and self._model is not None:
            # No reading yet: the configured budget still bounds the tier (at the checkpoint's
            # own bytes per token), rather than admitting without a limit.
            total, used = self.vcfg.kv_budget_bytes, 0
        else:
            return None
        return Capacity(
            kv_bytes_total=total,
            kv_bytes_free=max(0, total - used),
            bytes_per_token=self._bytes_per_token(),
            block_size=r.block_size,
            context_window=self._model.context_window if self._model else 0,
            adapter_budget_bytes=self.vcfg.adapter_budget_bytes,
            resident_adapters=sorted(self.remote.resident),
            shared=True,  # every gateway process sends to this vLLM
        )

    def memory(self) -> MemorySnapshot:
        r = self._fresh()
        used = int(r.kv_bytes_total * r.kv_usage)
        return MemorySnapshot(adapters=self.remote.resident, kv_used=used,
                              kv_free=r.kv_bytes_total - used)

    def stats(self) -> BackendStats:
        r = self._fresh()
        return BackendStats(waiting=r.waiting, running=r.running, adapter_loads=self.remote.loads,
                            adapter_hits=self.remote.hits, adapter_evictions=self.remote.evictions,
                            upstream_retries=self.retried, upstream_failures=self.failures)
