"""gateway/pipeline.py in process: Pipeline.run over the default policy chain and scripted
backends. The chain's on_finish runs once per attempt with the attempt's outcome, whatever
ends it (done, refused, failed, closed early); a backend failing before its first chunk
falls back to the smaller tier (degrade) and the attempt's reservation goes back; after a
chunk went out there is no fallback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import BackendError, NotFound
from gateway.pipeline import Pipeline
from gateway.settings import parse_settings
from gateway.telemetry import RequestRecord
from policies.chain import FALLBACK
from tests.gateway.fakes import ACME_KEY, Gateway, ScriptedBackend, running, sha, text_chunks
from tests.server import metric

HI = [{"role": "user", "content": "hi"}]


def tiers(tmp_path: Path, allow_degrade: bool = True, max_output_tokens: int | None = None) -> Any:
    """`large` on backend big, degrading to `tiny` on backend small (policies/degrade.py)."""
    tenant: dict[str, Any] = {
        "name": "acme",
        "api_key_sha256": [sha(ACME_KEY)],
        "models": ["large", "tiny"],
        "allow_degrade": allow_degrade,
    }
    if max_output_tokens is not None:
        tenant["limits"] = {"max_output_tokens": max_output_tokens}
    return parse_settings(
        {
            "server": {"usage_log": str(tmp_path / "usage.jsonl")},
            "backends": {
                "big": {"kind": "openai", "url": "http://127.0.0.1:9/v1"},
                "small": {"kind": "openai", "url": "http://127.0.0.1:9/v1"},
            },
            "models": [
                {"name": "large", "backend": "big", "degrade_to": "tiny"},
                {"name": "tiny", "backend": "small"},
            ],
            "tenants": [tenant],
        }
    )


class Outcomes:
    """Records every PolicyChain.finish(ctx, outcome) of the state's chain, in order."""

    def __init__(self, gw: Gateway) -> None:
        self.seen: list[str] = []
        chain = gw.state.policies
        finish = chain.finish

        async def spy(ctx: RequestContext, outcome: Any) -> None:
            self.seen.append(outcome)
            await finish(ctx, outcome)

        chain.finish = spy  # type: ignore[method-assign]


def start(
    gw: Gateway, body: dict[str, Any]
) -> tuple[Pipeline, RequestContext, RequestRecord, AsyncGenerator[Chunk, None]]:
    state = gw.state
    tenant = state.tenants.authenticate(f"Bearer {ACME_KEY}")
    ctx = gw.handler.context("chat", tenant, body, "rid-1", state)
    rec = state.telemetry.open("chat", "POST", "/v1/chat/completions", {}, "rid-1")
    pipeline = Pipeline(state)
    return pipeline, ctx, rec, pipeline.run(ctx, rec)


async def drain(chunks: AsyncGenerator[Chunk, None]) -> list[Chunk]:
    out = [c async for c in chunks]
    await chunks.aclose()
    return out


def test_chunks_in_order_and_one_ok_finish(tmp_path: Path) -> None:
    big = ScriptedBackend("big")

    async def go() -> None:
        async with running(tmp_path, big, ScriptedBackend("small"), settings=tiers(tmp_path)) as gw:
            outcomes = Outcomes(gw)
            pipeline, ctx, rec, chunks = start(gw, {"model": "large", "messages": HI})
            got = await drain(chunks)
            assert [c.text for c in got] == ["Hello", " there", ""]
            assert got[-1].finish_reason == "stop" and ctx.usage is got[-1].usage
            assert outcomes.seen == ["ok"]
            assert gw.reserved == 0 and (big.opened, big.closed) == (1, 1)
            assert rec.first_chunk is not None and rec.generate_end is not None
            assert rec.completion_tokens == 2
            headers = pipeline.headers(ctx)
            assert headers["x-gateway-backend"] == "big"
            assert int(headers["x-gateway-kv-bytes"]) == ctx.memory.kv_bytes_reserved > 0
            assert "x-gateway-degraded-from" not in headers
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_closing_early_is_a_cancel_that_frees_everything(tmp_path: Path) -> None:
    big = ScriptedBackend("big", script=[*text_chunks("a", "b", "c")])

    async def go() -> None:
        async with running(tmp_path, big, ScriptedBackend("small"), settings=tiers(tmp_path)) as gw:
            outcomes = Outcomes(gw)
            _, _, rec, chunks = start(gw, {"model": "large", "messages": HI})
            assert (await anext(chunks)).text == "a"
            assert gw.reserved > 0  # held while the generation runs
            await chunks.aclose()
            assert outcomes.seen == ["cancelled"]
            assert gw.reserved == 0 and (big.opened, big.closed) == (1, 1)
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_closing_after_the_last_chunk_is_ok(tmp_path: Path) -> None:
    """The handler answers with the last chunk, then closes: that is no cancellation."""

    async def go() -> None:
        async with running(
            tmp_path, ScriptedBackend("big"), ScriptedBackend("small"), settings=tiers(tmp_path)
        ) as gw:
            outcomes = Outcomes(gw)
            _, _, rec, chunks = start(gw, {"model": "large", "messages": HI})
            while (await anext(chunks)).finish_reason is None:
                pass
            await chunks.aclose()
            assert outcomes.seen == ["ok"] and gw.reserved == 0
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_a_policy_refusal_is_rejected_and_no_backend_runs(tmp_path: Path) -> None:
    big = ScriptedBackend("big", adapters={})

    async def go() -> None:
        async with running(tmp_path, big, ScriptedBackend("small"), settings=tiers(tmp_path)) as gw:
            outcomes = Outcomes(gw)
            _, ctx, rec, chunks = start(gw, {"model": "large", "messages": HI})
            ctx.requested_adapter = "nope"  # adapter_selection: not on the backend, 404
            with pytest.raises(NotFound) as info:
                await anext(chunks)
            assert info.value.code == "adapter_not_found"
            assert info.value.headers["x-gateway-backend"] == "big"  # the pipeline's headers
            assert outcomes.seen == ["rejected"]
            assert big.opened == 0 and gw.reserved == 0
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_a_failure_before_the_first_chunk_falls_back_to_the_smaller_tier(tmp_path: Path) -> None:
    big = ScriptedBackend("big", script=[BackendError("down", 503, "upstream_unavailable")])
    small = ScriptedBackend(
        "small", script=[*text_chunks("tiny says"), Chunk(finish_reason="stop")]
    )

    async def go() -> None:
        async with running(tmp_path, big, small, settings=tiers(tmp_path)) as gw:
            outcomes = Outcomes(gw)
            pipeline, ctx, rec, chunks = start(gw, {"model": "large", "messages": HI})
            got = await drain(chunks)
            assert [c.text for c in got] == ["tiny says", ""]
            assert outcomes.seen == ["retried", "ok"]  # the attempt's holds, then the answer's
            assert (ctx.failed_backends, ctx.backend, ctx.target_model) == (
                ["big"],
                "small",
                "tiny",
            )
            assert ctx.degraded_from == "large"
            assert pipeline.headers(ctx)["x-gateway-degraded-from"] == "large"
            fallbacks = [d for d in ctx.decisions if d.policy == FALLBACK]
            assert len(fallbacks) == 1 and fallbacks[0].status == 503
            assert (big.closed, small.opened, small.closed) == (1, 1, 1)
            assert gw.reserved == 0
            gw.state.telemetry.close(rec)

    asyncio.run(go())


@pytest.mark.parametrize(("status", "allow"), [(400, True), (503, False)])
def test_no_fallback_for_a_client_error_or_a_tenant_that_refuses_it(
    tmp_path: Path, status: int, allow: bool
) -> None:
    big = ScriptedBackend("big", script=[BackendError("no", status, "upstream_error")])
    small = ScriptedBackend("small")

    async def go() -> None:
        async with running(tmp_path, big, small, settings=tiers(tmp_path, allow)) as gw:
            outcomes = Outcomes(gw)
            _, _, rec, chunks = start(gw, {"model": "large", "messages": HI})
            with pytest.raises(BackendError) as info:
                await anext(chunks)
            assert info.value.status == status
            assert outcomes.seen == ["error"]
            assert small.opened == 0 and gw.reserved == 0
            scraped = gw.state.telemetry.scrape().decode()
            assert (
                metric(
                    scraped,
                    "gateway_backend_errors_total",
                    backend="big",
                    phase="before_first_byte",
                )
                == 1
            )
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_no_fallback_once_a_chunk_went_out(tmp_path: Path) -> None:
    big = ScriptedBackend(
        "big", script=[*text_chunks("a"), BackendError("reset", 503, "upstream_reset")]
    )
    small = ScriptedBackend("small")

    async def go() -> None:
        async with running(tmp_path, big, small, settings=tiers(tmp_path)) as gw:
            outcomes = Outcomes(gw)
            _, _, rec, chunks = start(gw, {"model": "large", "messages": HI})
            assert (await anext(chunks)).text == "a"
            with pytest.raises(BackendError):
                await anext(chunks)
            assert outcomes.seen == ["error"] and small.opened == 0
            assert gw.reserved == 0 and big.closed == 1
            scraped = gw.state.telemetry.scrape().decode()
            assert (
                metric(scraped, "gateway_backend_errors_total", backend="big", phase="mid_stream")
                == 1
            )
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_the_fallback_is_bounded(tmp_path: Path) -> None:
    """Both tiers fail: one fallback, then the error (no loop between tiers)."""
    big = ScriptedBackend("big", script=[BackendError("down", 503, "upstream_unavailable")])
    small = ScriptedBackend("small", script=[BackendError("down", 503, "upstream_unavailable")])

    async def go() -> None:
        async with running(tmp_path, big, small, settings=tiers(tmp_path)) as gw:
            outcomes = Outcomes(gw)
            _, ctx, rec, chunks = start(gw, {"model": "large", "messages": HI})
            with pytest.raises(BackendError):
                await anext(chunks)
            assert outcomes.seen == ["retried", "error"]
            assert (big.opened, small.opened) == (1, 1) and ctx.failed_backends == ["big", "small"]
            assert gw.reserved == 0
            gw.state.telemetry.close(rec)

    asyncio.run(go())


def test_the_output_cap_header(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(
            tmp_path,
            ScriptedBackend("big"),
            ScriptedBackend("small"),
            settings=tiers(tmp_path, max_output_tokens=32),
        ) as gw:
            pipeline, ctx, rec, chunks = start(gw, {"model": "large", "messages": HI})
            await drain(chunks)
            assert pipeline.headers(ctx)["x-gateway-max-output-tokens"] == "32"
            _, ctx2, rec2, chunks2 = start(gw, {"model": "large", "messages": HI, "max_tokens": 8})
            await drain(chunks2)
            assert "x-gateway-max-output-tokens" not in pipeline.headers(ctx2)
            gw.state.telemetry.close(rec)
            gw.state.telemetry.close(rec2)

    asyncio.run(go())
