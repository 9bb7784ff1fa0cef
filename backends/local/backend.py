"""The `local` backend: the embedded torch engine behind the Backend protocol."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from backends.hf.tokenizer import ChatTokenizer, TokenizerError, TooManyTokens
from backends.local import generation, grammar, placement, request
from backends.local.adapter_cache import AdapterCache, Resident
from backends.local.engine import Engine, Event
from backends.local.grammar import GrammarLimits, Grammars
from backends.local.loader import CheckpointError, LoadedModel, load_checkpoint, parse_dtype
from backends.local.mailbox import Mailbox
from backends.local.request import LocalRequest
from backends.local.runtime_memory import (
    cuda_available,
    device_baseline,
    device_bytes,
    resident_bytes,
)
from backends.local.sampler import Sampler
from backends.local.toolcalls import ToolCallParser
from gateway.core import cpu
from gateway.core.backend import BackendStats, Capacity, MemorySnapshot
from gateway.core.config import PRIORITY_RANK
from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import BackendError, InvalidRequest
from gateway.core.kv import KV_ADMISSION_MODES, KV_DTYPES, Lanes, kv_output_tokens

MiB = 1024 * 1024
PREFIX_CACHE_MODES = ("isolated", "shared", "off")
QUANTIZE_MODES = ("none", "int8")  # int8 at load: heap copy; `gateway quantize` for mmapped int8

log = logging.getLogger("backends.local")


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
    # -- KV capacity: what a sequence reserves for its output, the host swap space
    kv_admission: str = "estimate"  # estimate (preempt when wrong) | worst_case (reserve-all)
    swap_bytes: int = 0  # host RAM for preempted sequences' KV; 0: recompute them instead
    kv_dtype: str = "auto"  # auto (the compute dtype) | int8 (per-token per-head scales)
    prefix_cache: str = "isolated"  # isolated (per tenant) | shared (across tenants) | off
    lanes: Lanes | None = None  # {short_max_tokens, short_share}: KV kept for short requests
    # -- fidelity: bounds of grammar-constrained decoding (backends/local/grammar.py)
    grammar_max_schema_bytes: int = 64 * 1024  # a larger schema or tools list: 400
    grammar_compile_timeout_s: float = 2.0  # CPU s of a compile's worker; then killed: 400
    grammar_cache: str = "isolated"  # isolated (per tenant) | shared (across tenants)
    grammar_cache_bytes: int = 64 * MiB  # compiled grammars kept (LRU, xgrammar's sizes)
    # -- end fidelity

    def __post_init__(self) -> None:
        self.grammar_limits()
        parse_dtype(self.dtype)
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"quantize={self.quantize!r} is not supported; expected one of {QUANTIZE_MODES}"
            )
        if self.kv_cache_bytes <= 0 or self.adapter_cache_bytes < 0 or self.swap_bytes < 0:
            raise ValueError("kv_cache_bytes must be positive, adapter_cache_bytes and "
                             "swap_bytes >= 0")
        if self.prefix_cache not in PREFIX_CACHE_MODES:
            raise ValueError(f"prefix_cache={self.prefix_cache!r}; expected one of "
                             f"{', '.join(PREFIX_CACHE_MODES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={self.kv_dtype!r}; expected one of {', '.join(KV_DTYPES)}")
        if self.kv_admission not in KV_ADMISSION_MODES:
            raise ValueError(f"kv_admission={self.kv_admission!r}; expected one of "
                             f"{', '.join(KV_ADMISSION_MODES)}")
        if re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device={self.device!r}; expected cpu, cuda or cuda:N")
        if min(self.max_batch_size, self.block_size, self.max_prefill_tokens, self.max_loras) <= 0:
            raise ValueError(
                "max_batch_size, block_size, max_prefill_tokens and max_loras must be positive"
            )

    def grammar_limits(self) -> GrammarLimits:
        return GrammarLimits(self.grammar_max_schema_bytes, self.grammar_compile_timeout_s,
                             self.grammar_cache_bytes, self.grammar_cache)


class LocalBackend:
    Config = LocalConfig

    def __init__(self, name: str, cfg: LocalConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._loaded: LoadedModel | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._engine: Engine | None = None
        self._adapters: AdapterCache | None = None
        self._grammars: Grammars | None = None
        self._closed = False
        self._mailbox: Mailbox[tuple[int, Event]] | None = None  # engine events -> this loop's queues
        self._runtime = 0  # measured at start: interpreter, libraries, kernel caches (see _warm_up)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is not None:
            return
        if self.cfg.device.startswith("cuda") and not cuda_available():
            raise BackendError(f"{self.name}: device {self.cfg.device} asked for, but torch sees "
                               "no CUDA device here", 500)
        placement.prepare_process()  # the loading thread computes on one thread (placement.py)
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
            swap_bytes=self.cfg.swap_bytes,
            kv_dtype=self.cfg.kv_dtype,
            lanes=self.cfg.lanes,
            owner=self.name,
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
        # every copy of the weights is explained by name, so none can hide in the runtime
        source = loaded.source_resident_bytes() if engine.device.type == "cpu" else 0
        explained = (loaded.weight_bytes + (source or 0) + engine.kv_bytes_total
                     + engine.workspace.peak)
        self._runtime = max(0, measured - explained)

    def _load(self) -> tuple[LoadedModel, ChatTokenizer]:
        cfg = self.cfg
        loaded = load_checkpoint(cfg.model, cfg.dtype, cfg.device, cfg.quantize)
        tokenizer = ChatTokenizer.from_dir(Path(self.cfg.model), loaded.config.eos_token_ids)
        tokenizer.max_ids = loaded.config.context_window  # a longer prompt is only counted
        self._grammars = Grammars(tokenizer.tokenizer, loaded.config.vocab_size,
                                  sorted(tokenizer.eos_token_ids), cfg.grammar_limits())
        self._grammars.start()  # compile workers warm before the first schema (background)
        return loaded, tokenizer

    async def aclose(self) -> None:
        self._closed = True
        if self._grammars is not None:
            self._grammars.close()
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)

    def available(self) -> bool:
        return True  # in-process: never out of rotation

    def forwards(self, kind: str) -> bool:
        return False  # Responses are served over chat (gateway/responses_api.py)

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

    def _request(self, ctx: RequestContext) -> LocalRequest:
        """The request's fields as this engine serves them (400s name the field)."""
        if ctx.kind not in ("chat", "completion"):
            what = "embeddings" if ctx.kind == "embeddings" else f"{ctx.kind!r} requests"
            raise InvalidRequest(f"The model '{ctx.target_model}' is a generation model; it "
                                 f"serves no {what}.", param="model", code="model_not_supported")
        loaded, _, _, _ = self._parts()
        return request.read(ctx, ctx.target_model, loaded.config.vocab_size)

    def _prompts(self, tok: ChatTokenizer, ctx: RequestContext, req: LocalRequest) -> list[list[int]]:
        """Token ids of each prompt: the chat through its template (with the tools), or each
        completion prompt (text, or token ids as sent)."""
        try:
            if ctx.kind == "chat":
                return [tok.encode_chat(ctx.messages or [], req.tools, req.template_kwargs)]
            p = ctx.prompt
            prompts: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p or [])
            vocab = self._parts()[0].config.vocab_size
            out = []
            for i, one in enumerate(prompts):
                if isinstance(one, str):
                    out.append(tok.encode(one))
                elif any(t >= vocab for t in one):
                    raise InvalidRequest(f"'prompt' holds a token id outside this model's "
                                         f"vocabulary (0 to {vocab - 1}).",
                                         param="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                                         code="invalid_value")
                else:
                    out.append(list(one))
            return out
        except TokenizerError as e:  # the template's own words (Python's) stay in the log
            log.warning("request %s: the chat template failed: %s", ctx.request_id, e)
            raise BackendError("The model's chat template cannot render these messages; check "
                               "their roles, order and content types.", 400,
                               "invalid_request") from None

    def count_tokens(self, ctx: RequestContext) -> int | None:
        if self._tokenizer is None:
            return None
        try:
            return sum(len(ids) for ids in self._tokenized(self._tokenizer, ctx, self._request(ctx)))
        except TooManyTokens as e:  # longer than the window (the first such prompt's count)
            return e.count

    def _tokenized(self, tok: ChatTokenizer, ctx: RequestContext, req: LocalRequest
                   ) -> list[list[int]]:
        """_prompts, once per request: the ids counted (by context_trim or admission, maybe on
        a pool thread) are kept on ctx for the messages or prompt they were counted of, and
        generation takes them from there."""
        source = ctx.messages if ctx.kind == "chat" else ctx.prompt
        memo = ctx.tokenized
        if memo is not None and memo[0] == self.name and memo[1] is source:
            return memo[2]
        ids = self._prompts(tok, ctx, req)
        ctx.tokenized = (self.name, source, ids)
        return ids

    # ---- generation --------------------------------------------------------------------

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        loaded, tok, engine, adapters = self._parts()
        req = self._request(ctx)
        window = loaded.config.context_window
        try:
            prompts = await cpu.offload(ctx.tenant, ctx.body_bytes,
                                        lambda: self._tokenized(tok, ctx, req))
        except TooManyTokens as e:
            raise BackendError(f"this model's context window is {window} tokens; the prompt "
                               f"has at least {e.count} tokens", 400, "context_length_exceeded"
                               ) from None
        if not all(prompts):
            raise BackendError("the prompt is empty", 400, "invalid_request")
        ctx.prompt_tokens = sum(len(ids) for ids in prompts)
        worst = reserve = 0
        limits, reserves = [], []
        wrapper = self._wrapper_tokens(req)  # forced, on top of max_tokens (jump-forward)
        for ids in prompts:
            limit = req.max_tokens if req.max_tokens is not None else window - len(ids) - wrapper
            if len(ids) + max(limit, 1) + wrapper > window:
                asked = f"max_tokens is {req.max_tokens}" if req.max_tokens is not None else \
                    "no room is left for an answer"
                raise BackendError(
                    f"this model's context window is {window} tokens; the prompt has {len(ids)} "
                    f"tokens and {asked}", 400, "context_length_exceeded")
            limits.append(limit)
            expected = limit if ctx.expected_tokens is None else min(limit, ctx.expected_tokens)
            out = kv_output_tokens(limit, expected, self.cfg.kv_admission) + wrapper
            reserves.append(len(ids) + out)
            worst += req.n * engine.kv_bytes_for(len(ids) + limit + wrapper)
            reserve += req.n * engine.kv_bytes_for(len(ids) + out)
        if worst > engine.kv_bytes_total:
            raise BackendError(
                f"prompt + max_tokens needs {worst} bytes of KV cache; the whole cache is "
                f"{engine.kv_bytes_total} bytes", 400, "context_length_exceeded")
        choices = await self._choices(ctx, tok, req, prompts, limits, loaded.config.vocab_size)
        for c in choices:
            c.reserve = reserves[c.index // req.n]
            c.wrapper_tokens = wrapper
        resident: Resident | None = None
        if ctx.adapter is not None:
            resident = await adapters.acquire(ctx.adapter)
            ctx.memory.adapter, ctx.memory.adapter_bytes = ctx.adapter, resident.nbytes
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        try:
            ctx.memory.kv_bytes_reserved = reserve
            stream = generation.run(ctx, engine, tok, req, choices,
                                    resident.device_slot if resident is not None else 0,
                                    self._mailbox.post, PRIORITY_RANK.get(ctx.priority, 1),
                                    self._prefix_salt(ctx, req, resident))
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()
        finally:
            if resident is not None and ctx.adapter is not None:
                adapters.release(ctx.adapter)

    def _prefix_salt(self, ctx: RequestContext, req: LocalRequest,
                     resident: Resident | None) -> bytes | None:
        """What cached KV blocks this request may share: those of the same adapter (by name
        and content, so a reloaded adapter never meets stale blocks) and, with `isolated`,
        the same tenant (a cache hit is a timing signal). None: no sharing (`off`, or an
        echo, which reads the prompt back)."""
        mode = self.cfg.prefix_cache
        if mode == "off" or req.echo:
            return None
        adapter = "" if resident is None else f"{resident.adapter.name}:{resident.adapter.digest}"
        tenant = ctx.tenant if mode == "isolated" else ""
        return hashlib.blake2b(f"{tenant}\0{adapter}".encode(), digest_size=16).digest()

    async def _choices(self, ctx: RequestContext, tok: ChatTokenizer, req: LocalRequest,
                       prompts: list[list[int]], limits: list[int], vocab: int
                       ) -> list[generation.Choice]:
        spec = self._grammar(req)
        grammars = self._grammars
        eos = tok.eos_token_ids
        choices = []
        for p, ids in enumerate(prompts):
            echo = ""
            if req.echo:
                raw: Any = ctx.prompt
                one = raw if isinstance(raw, str) else raw[p] if isinstance(raw, list) else None
                echo = one if isinstance(one, str) else tok.decode(ids)
            for j in range(req.n):
                index = p * req.n + j
                constraint = None
                if spec is not None and grammars is not None:
                    constraint = await grammars.constraint(*spec, tenant=ctx.tenant,
                                                           request_id=ctx.request_id)
                sampler = generation.sampler_for(req, vocab, index, ids, constraint,
                                                 self._token_text, eos)
                parser = ToolCallParser() if req.tools and req.tool_choice != "none" else None
                choices.append(generation.Choice(index, ids, limits[p], sampler, parser, echo))
        return choices

    def _wrapper_tokens(self, req: LocalRequest) -> int:
        """Tokens of the longest tool-call wrapper the grammar may force (0 without tools)."""
        if self._grammars is None or not req.tools or req.tool_choice == "none":
            return 0
        self._grammars.check_size("tools", req.tools)  # bounds the names encoded here
        named = [t for t in req.tools if t["function"]["name"] == req.tool_choice]
        return self._grammars.wrapper_tokens(named or req.tools)

    def _grammar(self, req: LocalRequest) -> tuple[str, str] | None:
        """(the grammar text, the param it comes from) when the output is constrained."""
        if self._grammars is None:
            return None
        if req.tools and req.tool_choice != "none":
            self._grammars.check_size("tools", req.tools)
            named = [t for t in req.tools if t["function"]["name"] == req.tool_choice]
            text: dict[str, Any] | bool = False
            if req.response_format != "text":
                text = req.schema if req.schema is not None else True
            gram = grammar.tools_grammar(named or req.tools, req.tool_choice != "auto",
                                         req.parallel_tool_calls and not named, text)
            return gram, "tools"
        if req.response_format == "text":
            return None
        self._grammars.check_size("response_format", req.schema)
        return grammar.json_grammar(req.schema), "response_format"

    def _token_text(self, token: int) -> str:
        return self._tokenizer.decode([token]) if self._tokenizer is not None else str(token)

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
            kv_admission=self.cfg.kv_admission,
            lanes=self.cfg.lanes,
            swap_bytes_total=self.cfg.swap_bytes,
        )

    def stats(self) -> BackendStats:
        """Queue and batch sizes, adapter cache counters (read without locks: telemetry)."""
        if self._engine is None or self._adapters is None:
            return BackendStats()
        sched, adapters = self._engine.scheduler, self._adapters.stats
        pre = sched.stats
        return BackendStats(
            waiting=len(sched.waiting) + len(sched.preempted),
            running=len(sched.running),
            adapter_loads=adapters.loads,
            adapter_hits=adapters.hits + adapters.host_hits,
            adapter_evictions=adapters.evictions,
            adapters_pinned=self._adapters.pinned(),
            kv_swapped_bytes=self._engine.kv_bytes_swapped,
            kv_preemptions=pre.preemptions,
            kv_swap_outs=pre.swapped_out,
            kv_recomputes=pre.recomputed,
            kv_resumes=pre.resumed,
            prefix_query_tokens=pre.prefix_query_tokens,
            prefix_hit_tokens=pre.prefix_hit_tokens,
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
            loaded = self._loaded
            snap.weights, snap.weights_heap = loaded.mapped_bytes, loaded.heap_bytes
            if device is None or device.type == "cpu":
                snap.weights_source = loaded.source_resident_bytes() or 0
        if self._adapters is not None:
            snap.adapters = self._adapters.sizes()
        if self._engine is not None:
            snap.kv_used = self._engine.kv_bytes_used
            snap.kv_free = self._engine.kv_bytes_total - snap.kv_used
            snap.workspace = self._engine.workspace.peak + self._engine.model.lora_stack_bytes()
            if self._engine.device.type == "cpu":  # on CUDA the swap is host memory, not measured
                snap.kv_swapped = self._engine.kv_bytes_swapped
        if self._grammars is not None and (device is None or device.type == "cpu"):
            # compiled grammars live in this process's heap; the compile workers are other
            # processes: their PSS is added to what is measured, and named (on CUDA both are
            # host memory, which is not what is measured there)
            snap.grammar_cache = self._grammars.cache_sizes()
            snap.grammar_workers = self._grammars.workers.memory_bytes()
            if snap.measured is not None:
                snap.measured += snap.grammar_workers
        return snap
