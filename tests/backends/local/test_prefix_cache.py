"""Prefix sharing on the real engine: cached blocks are reused by the same adapter (by
content) and, with `isolated`, the same tenant only; answers are unchanged; `n > 1` shares
the prompt's blocks; echo bypasses the cache; usage reports cached_tokens."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from backends.local.backend import LocalBackend
from backends.local.loader import load_checkpoint
from backends.local.lora import load_adapter
from gateway.core.context import RequestContext

from .conftest import TinyCheckpoint
from .test_backend import collect, ctx_for, run_with, wait_kv_free

LONG = "Memory is the budget: every byte a request causes is accounted for. " * 2


def ask(prompt: str = LONG, tenant: str = "t", adapter: str | None = None,
        **sampling: object) -> RequestContext:
    ctx = ctx_for(prompt, adapter=adapter, max_tokens=8, **sampling)
    ctx.tenant = tenant
    return ctx


async def cached(b: LocalBackend, ctx: RequestContext) -> tuple[str, int]:
    text, last = await collect(b, ctx)
    assert last.usage is not None
    return text, last.usage.cached_tokens


def test_isolated_shares_within_tenant_and_adapter_only(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        first, hit0 = await cached(b, ask())
        again, hit = await cached(b, ask())
        assert hit0 == 0 and hit > 0 and hit % 16 == 0 and again == first  # same answer
        ctx = ask()
        await collect(b, ctx)
        assert hit <= (ctx.prompt_tokens or 0) - 1  # the last token is always computed
        assert (await cached(b, ask(tenant="other")))[1] == 0  # isolated: another tenant
        assert (await cached(b, ask(adapter="acme")))[1] == 0  # another adapter: other K/V
        assert (await cached(b, ask(adapter="acme")))[1] == hit  # the same adapter shares
        assert (await cached(b, ask(tenant="other")))[1] == hit  # the other tenant's own
        stats = b.stats()
        assert stats.prefix_hit_tokens == 4 * hit and stats.prefix_query_tokens
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body)


def test_shared_mode_shares_across_tenants_and_off_never(tiny_checkpoint: TinyCheckpoint) -> None:
    async def shared(b: LocalBackend) -> None:
        text, _ = await cached(b, ask(tenant="a"))
        other, hit = await cached(b, ask(tenant="b"))
        assert hit > 0 and other == text

    async def off(b: LocalBackend) -> None:
        await cached(b, ask())
        assert (await cached(b, ask()))[1] == 0
        assert b.stats().prefix_query_tokens == 0

    run_with(tiny_checkpoint, shared, prefix_cache="shared")
    run_with(tiny_checkpoint, off, prefix_cache="off")


def test_n_choices_share_the_prompt_and_echo_bypasses(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        ctx = ask(n=3)
        choices: dict[int, str] = {}
        async for chunk in b.generate(ctx):
            choices[chunk.index] = choices.get(chunk.index, "") + chunk.text
            usage = chunk.usage
        assert len(set(choices.values())) == 1 and len(choices) == 3  # greedy: all the same
        prompt = ctx.prompt_tokens or 0
        shared = (prompt - 1) // 16 * 16
        stats = b.stats()
        assert stats.prefix_hit_tokens == 2 * shared > 0  # the two followers, nothing else
        assert usage is not None and usage.cached_tokens == 0  # the first computed it
        # the ledger counts a shared block once; each request carries its share of it
        assert ctx.memory.kv_bytes_peak_share < ctx.memory.kv_bytes_peak
        echo, plain = ask(kind="completion"), ask(kind="completion")
        echo.body["echo"] = True
        await collect(b, plain)
        assert (await cached(b, plain))[1] > 0
        assert (await cached(b, echo))[1] == 0
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body)


def test_concurrent_requests_with_a_common_prefix_answer_as_alone(
    tiny_checkpoint: TinyCheckpoint,
) -> None:
    questions = [LONG + q for q in ("Why?", "How so?", "And then?", "Who?")]

    async def body(b: LocalBackend) -> None:
        alone = [await cached(b, ask(q)) for q in questions]  # each alone (hits after the 1st)
        together = await asyncio.gather(*[cached(b, ask(q)) for q in questions])
        assert [t for t, _ in together] == [t for t, _ in alone]
        assert all(h > 0 for _, h in together)

    texts: dict[str, list[str]] = {}

    async def reference(b: LocalBackend) -> None:
        texts["off"] = [(await cached(b, ask(q)))[0] for q in questions]

    run_with(tiny_checkpoint, reference, prefix_cache="off")

    async def compare(b: LocalBackend) -> None:
        await body(b)
        texts["on"] = [(await cached(b, ask(q)))[0] for q in questions]

    run_with(tiny_checkpoint, compare)
    assert texts["on"] == texts["off"]


def test_adapter_digest_follows_its_content(tiny_checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    model = load_checkpoint(str(tiny_checkpoint.model_dir), "float32", "cpu", "none").model
    src = tiny_checkpoint.adapters_dir / tiny_checkpoint.adapter_name
    copy = tmp_path / "acme"
    shutil.copytree(src, copy)
    same = load_adapter(copy, model)
    assert same.digest == load_adapter(src, model).digest != ""
    cfg = copy / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": 8', '"lora_alpha": 6'))
    assert load_adapter(copy, model).digest != same.digest
