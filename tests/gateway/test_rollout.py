"""Rollouts in-process: config, the state machine and its store, sticky sides, pair
comparison, the guards, and the manager's automatic moves (no engine, no network)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.core.context import Chunk, RequestContext, SamplingParams, Usage
from gateway.core.errors import BackendError
from gateway.core.rollout_config import RolloutConfig, RolloutGuards
from gateway.metrics import GatewayMetrics
from gateway.rollout.compare import Answer, compare, token_agreement, validity
from gateway.rollout.guards import Side, Window, evaluate, p95
from gateway.rollout.manager import Rollouts, bucket, sticky_value
from gateway.rollout.metrics import RolloutMetrics
from gateway.rollout.state import MoveRefused, RolloutState, reconcile
from gateway.rollout.store import FileStore
from gateway.settings import ConfigError, parse_settings

SHA = "d4ffc8c0325f7e8e971bb4d7bc9f6a78c97920b5ac57b24380e53b6c7a96bc13"


def config(rollout: dict[str, Any] | None = None, **server: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"name": "demo", "backend": "a"}
    if rollout is not None:
        model["rollout"] = rollout
    return {"server": server,
            "backends": {"a": {"kind": "openai", "url": "http://127.0.0.1:1/v1"},
                         "b": {"kind": "openai", "url": "http://127.0.0.1:2/v1"}},
            "models": [model],
            "tenants": [{"name": "acme", "api_key_sha256": [SHA], "models": ["demo"]}]}


# ---- config ---------------------------------------------------------------------------


def test_config_keys_as_in_the_design() -> None:
    s = parse_settings(config({"candidate": "b", "stage": "canary", "shadow_share": 0.2,
                               "canary_steps": [0.1, 0.5, 1.0], "sticky": "tenant",
                               "window_requests": 20, "promote_after_windows": 3,
                               "guards": {"max_error_rate_delta": 0.05, "max_ttft_p95_ratio": 2,
                                          "min_agreement": 0.8, "max_kv_bytes_ratio": 1.1},
                               "auto": False}, state_dir="state"), base=Path("/srv/gw"))
    r = s.models[0].rollout
    assert r is not None and r.candidate == "b" and r.stage == "canary"
    assert r.canary_steps == (0.1, 0.5, 1.0) and r.sticky == "tenant" and not r.auto
    assert r.guards == RolloutGuards(0.05, 2.0, 0.8, 1.1)
    assert s.server.state_dir == "/srv/gw/state"
    assert parse_settings(config()).models[0].rollout is None


@pytest.mark.parametrize(("rollout", "field"), [
    ({"candidate": "nope"}, "rollout.candidate"),
    ({"candidate": "a"}, "rollout.candidate"),
    ({"candidate": "b", "stage": "rolled_back"}, "stage"),
    ({"candidate": "b", "sticky": "ip"}, "sticky"),
    ({"candidate": "b", "canary_steps": [0.5, 0.1]}, "canary_steps"),
    ({"candidate": "b", "canary_steps": [0, 1]}, "canary_steps"),
    ({"candidate": "b", "shadow_share": 2}, "shadow_share"),
    ({"candidate": "b", "window_requests": 0}, "window_requests"),
    ({"candidate": "b", "guards": {"min_agreement": 1.5}}, "min_agreement"),
    ({"candidate": "b", "typo": 1}, "typo"),
])
def test_bad_rollout_config_names_the_field(rollout: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_settings(config(rollout))


# ---- the state machine ------------------------------------------------------------------


CFG = RolloutConfig(candidate="b", canary_steps=(0.1, 0.5, 1.0), window_requests=4,
                    promote_after_windows=2)


def test_advance_walks_shadow_then_every_step_then_full() -> None:
    state = RolloutState.start("demo", CFG)
    seen = [(state.stage, state.share(CFG))]
    while state.stage != "full":
        state.advance(CFG, "promoted")
        seen.append((state.stage, state.share(CFG)))
    assert seen == [("shadow", 0.0), ("canary", 0.1), ("canary", 0.5), ("canary", 1.0),
                    ("full", 1.0)]
    with pytest.raises(MoveRefused):
        state.advance(CFG, "operator")
    assert [h["action"] for h in state.history] == ["start"] + ["advance"] * 4
    assert state.version == 5


def test_rollback_pause_promote_and_history() -> None:
    state = RolloutState.start("demo", CFG)
    state.apply("pause", CFG)
    assert state.paused and state.stage == "shadow"
    with pytest.raises(MoveRefused):
        state.apply("pause", CFG)
    state.apply("resume", CFG)
    state.advance(CFG, "promoted")
    state.rollback("error_rate", {"error_rate_delta": 0.3})
    assert (state.stage, state.share(CFG), state.shadowing(CFG)) == ("rolled_back", 0.0, False)
    assert state.history[-1]["figures"] == {"error_rate_delta": 0.3}
    assert state.history[-1]["from"] == "canary[0]"
    with pytest.raises(MoveRefused):
        state.apply("rollback", CFG)
    state.apply("promote", CFG)
    assert state.stage == "full"
    again = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state


def test_saved_state_wins_unless_the_candidate_changed() -> None:
    saved = RolloutState.start("demo", CFG)
    saved.advance(CFG, "promoted")
    saved.advance(CFG, "promoted")
    assert reconcile(saved, "demo", RolloutConfig(candidate="b", stage="off")) is saved
    fresh = reconcile(saved, "demo", RolloutConfig(candidate="c", stage="canary"))
    assert (fresh.candidate, fresh.stage, fresh.step) == ("c", "canary", 0)
    assert fresh.version > saved.version and fresh.history[-1]["reason"] == "config"
    assert reconcile(None, "demo", CFG).stage == "shadow"


def test_file_store_round_trip(tmp_path: Path) -> None:
    async def run() -> RolloutState | None:
        store = FileStore(str(tmp_path / "state"))
        state = RolloutState.start("demo", CFG)
        state.advance(CFG, "promoted")
        assert await store.save(state, -1)
        other = RolloutState.start("other", CFG)
        assert await store.save(other, -1)
        assert await FileStore(str(tmp_path / "state")).load("missing") is None
        return await FileStore(str(tmp_path / "state")).load("demo")

    loaded = asyncio.run(run())
    assert loaded is not None and (loaded.stage, loaded.step) == ("canary", 0)
    assert set(json.loads((tmp_path / "state" / "rollouts.json").read_text())) == {"demo", "other"}


# ---- sticky sides -----------------------------------------------------------------------


def ctx(user: str | None = "u1", tenant: str = "acme", model: str = "demo") -> RequestContext:
    return RequestContext(request_id="r", tenant=tenant, kind="chat", requested_model=model,
                          target_model=model, backend="a", sampling=SamplingParams(), user=user)


def test_sticky_keys() -> None:
    assert sticky_value(ctx("u1"), "user", "sk-1") == "u:acme:u1"
    assert sticky_value(ctx(None), "user", "sk-1") == "k:sk-1"  # no user: the API key
    assert sticky_value(ctx("u1"), "tenant", "sk-1") == "t:acme"
    assert sticky_value(ctx("u1"), "key", "sk-1") == "k:sk-1"


def test_bucket_is_stable_and_a_growing_share_keeps_the_candidate_side() -> None:
    users = [f"user-{i}" for i in range(2000)]
    points = [bucket("demo", "b", u) for u in users]
    assert points == [bucket("demo", "b", u) for u in users]
    at_half = {u for u, p in zip(users, points, strict=True) if p < 0.5}
    at_tenth = {u for u, p in zip(users, points, strict=True) if p < 0.1}
    assert at_tenth <= at_half
    assert 900 <= len(at_half) <= 1100 and 150 <= len(at_tenth) <= 250
    # another candidate is another experiment: other users
    other = {u for u in users if bucket("demo", "c", u) < 0.5}
    assert other != at_half


# ---- comparison -------------------------------------------------------------------------


def answer(text: str, finish: str = "stop", **kw: Any) -> Answer:
    a = Answer(**kw)
    a.add(Chunk(text=text))
    a.add(Chunk(finish_reason=finish, usage=Usage(3, len(text.split()))))
    return a


def test_greedy_pairs_exact_and_token_agreement() -> None:
    same = compare(answer("the cat sat"), answer("the cat sat"), {}, greedy=True)
    assert same.exact and same.token_agreement == 1.0 and same.score == 1.0
    near = compare(answer("the cat sat on the mat"), answer("the cat sat on a mat"), {}, True)
    assert not near.exact and 0.5 < near.score < 1.0
    assert token_agreement("a b c d", "w x y z") == 0.0
    finish = compare(answer("the cat"), answer("the cat", "length"), {}, True)
    assert not finish.finish_match and finish.score == 0.0


def test_sampled_pairs_by_length_and_ratios() -> None:
    p = answer("one two three four", ttft=0.1, latency=1.0, kv_bytes=1000)
    c = answer("uno dos tres cuatro cinco", ttft=0.3, latency=1.5, kv_bytes=500)
    r = compare(p, c, {}, greedy=False)
    assert r.token_agreement is None and r.score == 1.0
    assert r.length_ratio == pytest.approx(5 / 4)
    assert r.ttft_ratio == pytest.approx(3.0) and r.latency_ratio == pytest.approx(1.5)
    long = compare(answer("a"), answer("a b c d e f"), {}, greedy=False)
    assert long.score == 0.0


def test_json_and_tool_calls_validated_against_the_request() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert validity(answer('{"n": 3}'), body) is True
    assert validity(answer('{"n": "3"}'), body) is False
    assert validity(answer("not json"), {"response_format": {"type": "json_object"}}) is False
    assert validity(answer("plain"), {}) is None
    tools = {"tools": [{"type": "function", "function": {"name": "get", "parameters": schema}}]}
    call = Answer()
    call.add(Chunk(tool_calls=[{"index": 0, "function": {"name": "get", "arguments": '{"n"'}}]))
    call.add(Chunk(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]))
    call.add(Chunk(finish_reason="tool_calls"))
    wrong = Answer()
    wrong.add(Chunk(tool_calls=[{"index": 0, "function": {"name": "other", "arguments": "{}"}}]))
    wrong.add(Chunk(finish_reason="tool_calls"))
    assert call.tool_names == ["get"] and validity(call, tools) is True
    assert validity(wrong, tools) is False
    r = compare(call, wrong, tools, greedy=False)
    assert not r.tools_match and r.score == 0.0


def test_remote_events_are_read() -> None:
    a = Answer()
    a.add(Chunk(event={"choices": [{"index": 0, "delta": {"content": "hel"}}]}))
    a.add(Chunk(event={"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
                finish_reason="stop"))
    b = Answer()
    b.add(Chunk(event={"choices": [{"index": 0, "message": {"content": "hello"},
                                    "finish_reason": "stop"}], "usage": {"completion_tokens": 1}},
                finish_reason="stop"))
    assert (a.text, b.text, b.completion_tokens) == ("hello", "hello", 1)
    assert compare(a, b, {}, greedy=True).exact


# ---- guards -----------------------------------------------------------------------------


def window(cand_errors: int = 0, cand_ttft: float = 0.1, cand_kv: int = 100,
           scores: tuple[float, ...] = (1.0,)) -> Window:
    w = Window()
    for i in range(20):
        w.primary.add(False, 0.1, 100)
        w.candidate.add(i < cand_errors, cand_ttft, cand_kv)
    w.scores.extend(scores)
    return w


@pytest.mark.parametrize(("w", "broken"), [
    (window(), ()),
    (window(cand_errors=2), ("error_rate",)),
    (window(cand_ttft=0.2), ("ttft",)),
    (window(scores=(1.0, 0.5)), ("agreement",)),
    (window(cand_kv=200), ("kv_bytes",)),
    (window(cand_errors=20, cand_kv=200), ("error_rate", "kv_bytes")),
])
def test_each_guard_breaks_on_its_own(w: Window, broken: tuple[str, ...]) -> None:
    verdict = evaluate(w, w.primary, RolloutGuards())
    assert verdict.broken == broken
    assert verdict.figures["candidate_requests"] == 20


def test_unmeasured_guards_hold_and_p95() -> None:
    w = Window()
    w.candidate.add(False, None, 0)
    assert evaluate(w, Side(), RolloutGuards()).healthy
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([]) is None


# ---- the manager ------------------------------------------------------------------------


class Outcomes:
    """Drives a Rollouts like the pipeline does, without backends."""

    def __init__(self, cfg: RolloutConfig, stage: str) -> None:
        self.cfg = RolloutConfig(**{**cfg.__dict__, "stage": stage})
        self.rollouts = Rollouts(RolloutMetrics(GatewayMetrics()), rng=random.Random(7))
        self.rollouts.configure(parse_settings(config()), {})
        settings = parse_settings(config({"candidate": "b", "stage": stage}))
        model = settings.models[0].__class__(name="demo", backend="a", rollout=self.cfg)
        self.rollouts.configure(type(settings)(**{**settings.__dict__, "models": (model,)}), {})

    async def requests(self, n: int, *, cand_error: bool = False, cand_ttft: float = 0.1) -> None:
        for i in range(n):
            c = ctx(f"user-{i}")
            self.rollouts.route(c, "sk")
            bad = c.rollout == "candidate" and cand_error
            ttft = cand_ttft if c.rollout == "candidate" else 0.1
            self.rollouts.finished(c, "error" if bad else "ok", ttft, 0.5)
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)

    @property
    def live(self) -> Any:
        return self.rollouts.live["demo"]


def test_healthy_windows_advance_and_a_broken_guard_rolls_back() -> None:
    async def run() -> list[str]:
        o = Outcomes(CFG, "canary")
        await o.rollouts.start()
        stages = [o.live.state.label()]
        for _ in range(3):  # promote_after_windows=2: two healthy windows per step
            while o.live.state.label() == stages[-1]:
                await o.requests(10)
            stages.append(o.live.state.label())
        await o.requests(40, cand_error=True)
        stages.append(o.live.state.label())
        await o.rollouts.aclose()
        return stages

    assert asyncio.run(run()) == ["canary[0]", "canary[1]", "canary[2]", "full", "rolled_back"]


def test_slow_candidate_rolls_back_with_its_figures_and_counts_the_move() -> None:
    async def run() -> Outcomes:
        o = Outcomes(CFG, "canary")
        await o.rollouts.start()
        while o.live.state.stage == "canary":
            await o.requests(10, cand_ttft=1.0)
        await o.rollouts.aclose()
        return o

    o = asyncio.run(run())
    move = o.live.state.history[-1]
    assert (move["action"], move["reason"]) == ("rollback", "ttft")
    assert move["figures"]["ttft_p95_ratio"] == pytest.approx(10.0)
    assert move["figures"]["candidate_requests"] == CFG.window_requests
    moves = o.rollouts.metrics.moves.labels("demo", "rollback", "ttft")._value.get()
    assert moves == 1


def test_auto_false_and_pause_leave_moves_to_the_operator() -> None:
    async def run() -> tuple[str, str, str]:
        manual = Outcomes(RolloutConfig(**{**CFG.__dict__, "auto": False}), "canary")
        await manual.rollouts.start()
        await manual.requests(200, cand_error=True)
        paused = Outcomes(CFG, "canary")
        await paused.rollouts.start()
        await paused.rollouts.act("demo", "pause")
        await paused.requests(200, cand_error=True)
        state = await paused.rollouts.act("demo", "advance")
        return manual.live.state.label(), paused.live.state.label(), state.history[-1]["reason"]

    assert asyncio.run(run()) == ("canary[0]", "canary[1]", "operator")


def test_candidate_failing_before_its_first_byte_falls_back_and_counts() -> None:
    async def run() -> tuple[Any, ...]:
        o = Outcomes(CFG, "full")
        await o.rollouts.start()
        c = ctx("u")
        o.rollouts.route(c, "sk")
        assert (c.rollout, c.backend, c.rollout_backend) == ("candidate", "b", "b")
        decision = await o.rollouts.on_backend_error(c, BackendError("down", 502))
        again = await o.rollouts.on_backend_error(c, BackendError("down", 502))
        return decision.action, again.action, c.rollout, c.backend, c.rollout_backend, \
            o.live.window.candidate.errors

    assert asyncio.run(run()) == ("modify", "pass", "primary", "a", None, 1)


def test_a_window_with_too_few_primary_requests_is_judged_by_the_last_baseline() -> None:
    async def run() -> tuple[str, Any]:
        o = Outcomes(RolloutConfig(**{**CFG.__dict__, "canary_steps": (1.0,)}), "canary")
        await o.rollouts.start()
        live = o.live
        for _ in range(4):  # a baseline window: the primary served 4 requests at 0.1 s
            live.window.primary.add(False, 0.1, 100)
        for _ in range(4):
            live.window.candidate.add(False, 0.12, 100)
        o.rollouts._close_window(live)
        baseline = live.baseline
        live.window.primary.add(False, 0.001, 100)  # one straggler begun before the move
        for _ in range(4):
            live.window.candidate.add(False, 0.12, 100)
        o.rollouts._close_window(live)
        await asyncio.sleep(0)
        await o.rollouts.aclose()
        return live.state.stage, (baseline is live.baseline, live.last["ttft_p95_ratio"])

    assert asyncio.run(run()) == ("full", (True, 1.2))


def test_sampled_requests_that_never_ran_do_not_stop_the_sampling() -> None:
    from gateway.rollout import manager

    async def run() -> tuple[int, bool]:
        o = Outcomes(RolloutConfig(candidate="b", shadow_share=1.0), "shadow")
        await o.rollouts.start()
        kept = []
        for i in range(manager.MAX_SAMPLED + 10):  # refused after route(): never finished
            c = ctx(f"u{i}")
            kept.append(c)
            o.rollouts.route(c, "sk")
        last = kept[-1]
        return len(o.rollouts._answers), o.rollouts.recorder(last) is not None

    assert asyncio.run(run()) == (1024, True)
