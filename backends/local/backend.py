"""The `local` backend: the embedded torch engine behind the Backend protocol."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from backends.local.adapter_cache import AdapterCache, Resident
from backends.local.engine import Engine, EngineClosed, Event
from backends.local.loader import CheckpointError, LoadedModel, load_checkpoint, parse_dtype
from backends.local.mailbox import Mailbox
from backends.local.runtime_memory import (
    cuda_available,
    device_baseline,
    device_bytes,
    resident_bytes,
)
from backends.local.sampler import Sampler
from backends.local.tokenizer import ChatTokenizer, TokenizerError
from gateway.core.backend import BackendStats, Capacity, MemorySnapshot
from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import BackendError

MiB = 1024 * 1024
QUANTIZE_MODES = ("none", "int8")  # int8 at load: heap copy; `gateway quantize` for mmapped int8


@dataclass(frozen=True)
class LocalConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model", "adapters_dir")  # relative to the config file

    model: str
    dtype: str = "float32"
    quantize: str = "none"
    kv_cache_bytes: int = 256 * MiB
    adapters_dir: str | None = None
    adapter_cache_bytes: int = 64 * MiB
    device: str = "cpu"
    max_batch_size: int = 32
    block_size: int = 16
    max_prefill_tokens: int = 512  # prompt tokens per step (chunked prefill)
    max_loras: int = 8  # LoRA slots (the device tier of the adapter cache)

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"quantize={self.quantize!r} is not supported; expected one of {QUANTIZE_MODES}"
            )
        if self.kv_cache_bytes <= 0 or self.adapter_cache_bytes < 0:
            raise ValueError("kv_cache_bytes must be positive and adapter_cache_bytes >= 0")
        if re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device={self.device!r}; expected cpu, cuda or cuda:N")
        if min(self.max_batch_size, self.block_size, self.max_prefill_tokens, self.max_loras) <= 0:
            raise ValueError(
                "max_batch_size, block_size, max_prefill_tokens and max_loras must be positive"
            )


class LocalBackend:
    Config = LocalConfig

    def __init__(self, name: str, cfg: LocalConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._loaded: LoadedModel | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._engine: Engine | None = None
        self._adapters: AdapterCache | None = None
        self._closed = False
        self._mailbox: Mailbox[Event] | None = None  # engine events -> this loop's queues
        self._runtime = 0  # measured at start: interpreter, libraries, kernel caches (see _warm_up)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is not None:
            return
        if self.cfg.device.startswith("cuda") and not cuda_available():
            raise BackendError(f"{self.name}: device {self.cfg.device} asked for, but torch sees "
                               "no CUDA device here", 500)
        try:
            loaded, tokenizer = await asyncio.to_thread(self._load)
        except (CheckpointError, TokenizerError, ValueError, OSError) as e:
            raise BackendError(f"{self.name}: cannot load {self.cfg.model}: {e}", 500) from e
        engine = Engine(
            loaded.model,
            self.cfg.kv_cache_bytes,
            max_batch_size=self.cfg.max_batch_size,
            block_size=self.cfg.block_size,
            device=self.cfg.device,
            max_prefill_tokens=self.cfg.max_prefill_tokens,
        )
        engine.start()
        self._loaded, self._tokenizer, self._engine = loaded, tokenizer, engine
        self._adapters = AdapterCache(
            loaded.model, self.cfg.adapters_dir, self.cfg.adapter_cache_bytes, self.cfg.max_loras
        )
        await self._warm_up(loaded, tokenizer, engine)

    async def _warm_up(self, loaded: LoadedModel, tok: ChatTokenizer, engine: Engine) -> None:
        """Run one full prefill budget and a few decode steps at the largest batch, then measure
        the runtime: RSS less weights, KV pool and workspace. It is what the process holds that
        no request causes: interpreter, libraries, the code pages and kernel caches the forward
        pass touches, allocator arenas sized by the largest step. Measured once here, it leaves
        `other` to show only what grows afterwards (fragmentation, leaks)."""
        vocab = loaded.config.vocab_size
        batch = max(1, min(self.cfg.max_batch_size, 8))
        prompt = max(1, min(self.cfg.max_prefill_tokens // batch, loaded.config.context_window // 4))
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            if ev.finish_reason is not None or ev.error is not None:
                loop.call_soon_threadsafe(finished.put_nowait, ev)

        submitted = 0
        for i in range(batch):
            ids = [(7 * i + 13 * j + 1) % vocab for j in range(prompt)]
            if engine.kv_bytes_for(prompt + 4) * (submitted + 1) > engine.kv_bytes_total:
                break
            engine.submit(ids, 4, Sampler(vocab, temperature=0.0), tok.detokenizer(ids), emit)
            submitted += 1
        for _ in range(submitted):
            await finished.get()
        measured = device_baseline(engine.device)  # after gc + malloc_trim (CPU)
        explained = loaded.weight_bytes + engine.kv_bytes_total + engine.workspace.peak
        self._runtime = max(0, measured - explained)

    def _load(self) -> tuple[LoadedModel, ChatTokenizer]:
        cfg = self.cfg
        loaded = load_checkpoint(cfg.model, cfg.dtype, cfg.device, cfg.quantize)
        tokenizer = ChatTokenizer.from_dir(Path(self.cfg.model), loaded.config.eos_token_ids)
        return loaded, tokenizer

    async def aclose(self) -> None:
        self._closed = True
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)

    def available(self) -> bool:
        return True  # in-process: never out of rotation

    async def health(self) -> bool:
        return not self._closed and self._engine is not None and self._engine.alive

    # ---- parts -------------------------------------------------------------------------

    def _parts(self) -> tuple[LoadedModel, ChatTokenizer, Engine, AdapterCache]:
        if self._closed:
            raise BackendError(f"backend {self.name} is closed", 503, "backend_closed")
        if (
            self._loaded is None
            or self._tokenizer is None
            or self._engine is None
            or self._adapters is None
        ):
            raise BackendError(f"backend {self.name} is not started", 503, "backend_not_ready")
        return self._loaded, self._tokenizer, self._engine, self._adapters

    def _encode(self, tok: ChatTokenizer, ctx: RequestContext) -> list[int]:
        try:
            if ctx.kind == "chat":
                if not ctx.messages:
                    raise BackendError("chat request without messages", 400, "invalid_request")
                return tok.encode_chat(ctx.messages)
            if ctx.kind == "completion":
                return tok.encode(ctx.prompt or "")
        except TokenizerError as e:
            raise BackendError(str(e), 400, "invalid_request") from None
        raise BackendError(f"unsupported request kind {ctx.kind!r}", 400, "invalid_request")

    def count_tokens(self, ctx: RequestContext) -> int | None:
        if self._tokenizer is None:
            return None
        return len(self._encode(self._tokenizer, ctx))

    # ---- generation --------------------------------------------------------------------

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        loaded, tok, engine, adapters = self._parts()
        ids = self._encode(tok, ctx)
        if not ids:
            raise BackendError("the prompt is empty", 400, "invalid_request")
        ctx.prompt_tokens = len(ids)
        sp = ctx.sampling
        max_tokens = sp.max_tokens
        if max_tokens < 1:
            raise BackendError("max_tokens must be at least 1", 400, "invalid_request")
        window = loaded.config.context_window
        if len(ids) + max_tokens > window:
            raise BackendError(
                f"this model's context window is {window} tokens; the prompt has {len(ids)} "
                f"tokens and max_tokens is {max_tokens}",
                400,
                "context_length_exceeded",
            )
        reserve = engine.kv_bytes_for(len(ids) + max_tokens)
        if reserve > engine.kv_bytes_total:
            raise BackendError(
                f"prompt + max_tokens needs {reserve} bytes of KV cache; the whole cache is "
                f"{engine.kv_bytes_total} bytes",
                400,
                "context_length_exceeded",
            )
        try:
            sampler = Sampler(
                loaded.config.vocab_size,
                sp.temperature,
                sp.top_p,
                sp.seed,
                sp.presence_penalty,
                sp.frequency_penalty,
            )
        except ValueError as e:
            raise BackendError(str(e), 400, "invalid_request") from None

        resident: Resident | None = None
        if ctx.adapter is not None:
            resident = await adapters.acquire(ctx.adapter)
            ctx.memory.adapter, ctx.memory.adapter_bytes = ctx.adapter, resident.nbytes
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        events: asyncio.Queue[Event] = asyncio.Queue()
        emit = functools.partial(self._mailbox.post, events)
        seq_id: int | None = None
        done = False
        try:
            try:
                seq_id = engine.submit(
                    ids,
                    max_tokens,
                    sampler,
                    tok.detokenizer(ids),
                    emit,
                    stop=list(sp.stop),
                    eos_ids=frozenset() if ctx.sampling.ignore_eos else tok.eos_token_ids,
                    adapter_slot=resident.device_slot if resident is not None else 0,
                )
            except EngineClosed as e:
                raise BackendError(str(e), 503, "backend_closed") from None
            ctx.memory.kv_bytes_reserved = reserve
            while True:
                ev = await events.get()
                while ev.finish_reason is None and ev.error is None and not events.empty():
                    nxt = events.get_nowait()  # arrived together: one chunk for both
                    nxt.text = ev.text + nxt.text
                    ev = nxt
                if ev.error is not None:
                    done = True
                    status, code = (
                        (503, "backend_closed")
                        if isinstance(ev.error, EngineClosed)
                        else (500, "backend_error")
                    )
                    raise BackendError(f"generation failed: {ev.error}", status, code)
                if ev.finish_reason is None:
                    yield Chunk(text=ev.text)
                    continue
                done = True
                ctx.memory.kv_bytes_peak = ev.kv_peak_bytes
                ctx.memory.workspace_bytes = ev.workspace_bytes
                ctx.memory.queue_seconds = ev.queue_seconds
                if ev.text:
                    yield Chunk(text=ev.text)
                yield Chunk(
                    finish_reason=ev.finish_reason,
                    usage=Usage(prompt_tokens=len(ids), completion_tokens=ev.completion_tokens),
                )
                return
        finally:
            if seq_id is not None and not done:
                engine.abort(seq_id)
            if resident is not None and ctx.adapter is not None:
                adapters.release(ctx.adapter)

    # ---- accounting --------------------------------------------------------------------

    async def ensure_adapter(self, name: str) -> None:
        _, _, _, adapters = self._parts()
        await adapters.ensure(name)

    def adapters(self) -> dict[str, int] | None:
        """Adapters in adapters_dir -> bytes: exact when resident, else the weight file sizes."""
        if self._adapters is None:
            return None
        cache = self._adapters
        sizes = cache.sizes()
        out: dict[str, int] = {}
        for name in cache.available():
            on_disk = (cache.dir / name).glob("*.safetensors") if cache.dir is not None else ()
            out[name] = sizes.get(name) or sum(f.stat().st_size for f in on_disk)
        return out

    def capacity(self) -> Capacity | None:
        if self._engine is None or self._loaded is None or self._adapters is None:
            return None
        e = self._engine
        return Capacity(
            kv_bytes_total=e.kv_bytes_total,
            kv_bytes_free=e.kv_bytes_total - e.kv_bytes_reserved,
            bytes_per_token=e.bytes_per_token,
            block_size=e.block_size,
            context_window=self._loaded.config.context_window,
            adapter_budget_bytes=self._adapters.budget_bytes,
            resident_adapters=sorted(self._adapters.resident),
        )

    def stats(self) -> BackendStats:
        """Queue and batch sizes, adapter cache counters (read without locks: telemetry)."""
        if self._engine is None or self._adapters is None:
            return BackendStats()
        sched, adapters = self._engine.scheduler, self._adapters.stats
        return BackendStats(
            waiting=len(sched.waiting),
            running=len(sched.running),
            adapter_loads=adapters.loads,
            adapter_hits=adapters.hits + adapters.host_hits,
            adapter_evictions=adapters.evictions,
            adapters_pinned=self._adapters.pinned(),
        )

    def adapter_stats(self) -> dict[str, int]:
        """Adapter cache counters (loads, hits, host_hits, demotions, evictions, waits)."""
        if self._adapters is None:
            return {}
        return dict(vars(self._adapters.stats))

    def memory(self) -> MemorySnapshot:
        device = self._engine.device if self._engine is not None else None
        measured = device_bytes(device) if device is not None else resident_bytes()
        snap = MemorySnapshot(measured=measured, runtime=self._runtime)
        if self._loaded is not None:
            snap.weights = self._loaded.weight_bytes
        if self._adapters is not None:
            snap.adapters = self._adapters.sizes()
        if self._engine is not None:
            snap.kv_used = self._engine.kv_bytes_used
            snap.kv_free = self._engine.kv_bytes_total - snap.kv_used
            snap.workspace = self._engine.workspace.peak
        return snap
