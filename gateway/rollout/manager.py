"""Rollouts: every configured rollout's live state, which side serves each request, the
windows the guards read, and the moves (automatic and the operator's).

One Rollouts lives as long as the app: a config reload re-configures it (an unchanged
rollout keeps its stage, window and report), the store keeps the stages across restarts
and, with shared_state, across processes (a process reads the shared stage every second)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.core.backend import Backend
from gateway.core.context import Decision, RequestContext
from gateway.core.errors import BackendError
from gateway.core.policy import Outcome, modified, passed
from gateway.core.rollout_config import RolloutConfig
from gateway.rollout.compare import Answer, Comparison
from gateway.rollout.guards import Report, Side, Verdict, Window, evaluate
from gateway.rollout.metrics import RolloutMetrics
from gateway.rollout.state import STAGE_NUMBER, MoveRefused, RolloutState, reconcile
from gateway.rollout.store import FileStore, MemoryStore, RedisStore, RolloutStore, StoreError
from gateway.settings import Settings

log = logging.getLogger("gateway.rollout")

SYNC_INTERVAL_S = 1.0  # how often a shared store is read again
MAX_SAMPLED = 1024  # primary answers recorded for shadow copies at once (the oldest go first)
ROLLOUT = "rollout"  # Decision.policy of a candidate's fallback to the primary


@dataclass
class Live:
    """One model's rollout in this process."""

    model: str
    primary: str  # the model's (first) backend
    cfg: RolloutConfig
    state: RolloutState
    window: Window = field(default_factory=Window)
    baseline: Side = field(default_factory=Side)  # the primary's last window with requests
    healthy_windows: int = 0
    report: Report = field(default_factory=Report)
    last: dict[str, Any] | None = None  # the last closed window's figures
    shadows_in_flight: int = 0

    def reset(self) -> None:
        """A move: windows start again (the new share is a new experiment)."""
        self.window = Window()
        self.healthy_windows = 0


def sticky_value(ctx: RequestContext, sticky: str, api_key: str | None) -> str:
    """What keeps a conversation on one side: the tenant, the request's `user`, or the API key
    (also where the sticky key is missing)."""
    if sticky == "tenant":
        return f"t:{ctx.tenant}"
    if sticky == "user" and ctx.user:
        return f"u:{ctx.tenant}:{ctx.user}"
    return f"k:{api_key or ctx.tenant}"


def bucket(model: str, candidate: str, value: str) -> float:
    """A stable point in [0, 1) for (rollout, model, sticky key): below the share, the
    candidate serves. A growing share keeps everyone already on the candidate there."""
    digest = hashlib.sha256(f"{candidate}\0{model}\0{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Rollouts:
    def __init__(self, metrics: RolloutMetrics, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.live: dict[str, Live] = {}
        self.store: RolloutStore = MemoryStore()
        self._store_key: tuple[str, object] = ("memory", None)
        self._answers: dict[int, Answer] = {}  # id(ctx) -> the primary's answer (sampled)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._started = False
        self.backends: Mapping[str, Backend] = {}
        # set by the app: runs a shadow copy (gateway/rollout/shadow.py)
        self.run_shadow: Callable[[Live, RequestContext, Answer], Any] | None = None

    # ---- config -----------------------------------------------------------------------

    def configure(self, settings: Settings, backends: Mapping[str, Backend]) -> None:
        """The rollouts `settings` name (at start and at every reload). An unchanged rollout
        keeps its live state; a new one or a new candidate is reconciled with the store."""
        self.backends = backends
        shared = settings.shared_state
        key: tuple[str, object] = (("redis", shared) if shared is not None
                                   else ("file", settings.server.state_dir)
                                   if settings.server.state_dir else ("memory", None))
        if key != self._store_key and not self._started:
            self.store = (RedisStore(shared) if shared is not None
                          else FileStore(settings.server.state_dir)
                          if settings.server.state_dir else MemoryStore())
            self._store_key = key
        elif key != self._store_key:
            log.warning("rollouts: a change of state_dir or shared_state needs a restart")
        fresh: dict[str, Live] = {}
        for m in settings.models:
            if m.rollout is None:
                continue
            old = self.live.get(m.name)
            if old is not None and old.state.candidate == m.rollout.candidate:
                old.cfg, old.primary = m.rollout, m.backend
                fresh[m.name] = old
                continue
            fresh[m.name] = Live(m.name, m.backend, m.rollout, RolloutState.start(m.name, m.rollout))
            if self._started:
                self._spawn(self._load(fresh[m.name]))
        self.live = fresh
        for live in fresh.values():
            self._show(live)

    async def start(self) -> None:
        """Each rollout's saved state, reconciled with the config (before serving)."""
        for live in list(self.live.values()):
            try:
                await self._load(live)
            except StoreError as exc:  # serve on the config's stage rather than not at all
                log.error("rollout %s: %s; starting at the config's stage %s", live.model, exc,
                          live.cfg.stage)
        self._started = True
        if self.store.shared:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def aclose(self) -> None:
        tasks = [*self._tasks, *([self._sync_task] if self._sync_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.store.aclose()

    async def _load(self, live: Live) -> None:
        saved = await self.store.load(live.model)
        state = reconcile(saved, live.model, live.cfg)
        if state is not saved:
            base = saved.version if saved is not None else -1
            if not await self.store.save(state, base):
                state = await self.store.load(live.model) or state
            else:
                self._count(live, state)
        live.state = state
        live.reset()
        self._show(live)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            for live in list(self.live.values()):
                try:
                    saved = await self.store.load(live.model)
                except StoreError as exc:
                    log.warning("rollouts: %s", exc)
                    break
                if saved is not None and saved.candidate == live.state.candidate \
                        and saved.version != live.state.version:
                    moved = saved.stage != live.state.stage or saved.step != live.state.step
                    live.state = saved
                    if moved:
                        live.reset()
                    self._show(live)

    # ---- the request path -------------------------------------------------------------

    def route(self, ctx: RequestContext, api_key: str | None) -> None:
        """Pick the side that serves ctx (before the policy chain): the candidate for a sticky
        share of traffic, else the primary; a primary request may be sampled for a shadow."""
        live = self.live.get(ctx.requested_model)
        if live is None or live.state.stage == "off" or not self._started:
            return
        state, cfg = live.state, live.cfg
        share = state.share(cfg)
        if share > 0 and bucket(live.model, cfg.candidate, sticky_value(ctx, cfg.sticky, api_key)) < share:
            ctx.rollout = "candidate"
            ctx.rollout_backend = ctx.backend = cfg.candidate
            return
        ctx.rollout = "primary"
        if state.shadowing(cfg) and ctx.kind != "embeddings" and self.rng.random() < cfg.shadow_share:
            if len(self._answers) >= MAX_SAMPLED:  # a request refused before its pipeline ran
                del self._answers[next(iter(self._answers))]  # left one: the oldest goes
            self._answers[id(ctx)] = Answer()

    def recorder(self, ctx: RequestContext) -> Answer | None:
        """The primary's answer, recorded while it streams, for a request sampled for shadow."""
        return self._answers.get(id(ctx))

    async def on_backend_error(self, ctx: RequestContext, error: BackendError) -> Decision:
        """Fallback: a candidate that failed before its first byte hands the request to the
        primary, and counts as a candidate error."""
        if ctx.rollout != "candidate" or ctx.rollout_backend is None:
            return passed(ROLLOUT)
        live = self.live.get(ctx.requested_model)
        candidate = ctx.rollout_backend
        ctx.rollout, ctx.rollout_backend = "primary", None
        ctx.backend = live.primary if live is not None else ctx.backend
        if live is not None:
            live.window.candidate.add(True, None, 0)
            self.metrics.requests.labels(live.model, "candidate").inc()
            self._close_window(live)
        return modified(ROLLOUT, f"rollout: candidate {candidate} failed ({error.code}); "
                                 "served by the primary")

    def finished(self, ctx: RequestContext, outcome: Outcome, ttft: float | None,
                 latency: float | None) -> None:
        """A request served under a rollout ended: its side's window, and a sampled primary
        answer's shadow copy (detached; it starts after the client's answer went out)."""
        answer = self._answers.pop(id(ctx), None)
        live = self.live.get(ctx.requested_model)
        if live is None or ctx.rollout is None or outcome not in ("ok", "error") \
                or ctx.degraded_from is not None:  # another tier answered: no side's figure
            return
        self.metrics.requests.labels(live.model, ctx.rollout).inc()
        if live.state.stage in ("canary", "full"):  # in shadow, the pairs fill the windows
            side = live.window.candidate if ctx.rollout == "candidate" else live.window.primary
            side.add(outcome == "error", ttft, ctx.memory.kv_bytes_peak)
        if answer is not None and outcome == "ok" and self.run_shadow is not None \
                and live.state.shadowing(live.cfg):
            answer.ttft, answer.latency = ttft, latency
            answer.kv_bytes = ctx.memory.kv_bytes_peak
            self._spawn(self.run_shadow(live, ctx, answer))
        if ctx.rollout == "candidate":
            self._close_window(live)

    def compared(self, live: Live, c: Comparison, primary: Answer, candidate: Answer) -> None:
        """A shadow pair compared (gateway/rollout/shadow.py)."""
        live.window.pair(c)
        live.report.add(c)
        self.metrics.agreement.labels(live.model).observe(c.score)
        if c.latency_ratio is not None:
            self.metrics.latency_ratio.labels(live.model).observe(c.latency_ratio)
        if live.state.stage == "shadow":  # the candidate serves no client: pairs fill windows
            live.window.candidate.add(candidate.error is not None, candidate.ttft,
                                      candidate.kv_bytes)
            live.window.primary.add(primary.error is not None, primary.ttft, primary.kv_bytes)
            self._close_window(live)

    # ---- windows and moves ------------------------------------------------------------

    def _close_window(self, live: Live) -> None:
        if live.window.candidate.requests < live.cfg.window_requests:
            return
        window = live.window
        # the primary's figures of the period, when it served enough of them to judge by (at
        # a step of 1.0 it serves only requests begun before the move): else the last that did
        if window.primary.requests * 2 >= live.cfg.window_requests:
            live.baseline = window.primary
        verdict = evaluate(window, live.baseline, live.cfg.guards)
        live.last = verdict.figures
        live.window = Window()
        if not live.cfg.auto or live.state.paused:
            return
        if verdict.broken:
            live.healthy_windows = 0
            self._spawn(self._auto(live, "rollback", verdict))
            return
        live.healthy_windows += 1
        if live.healthy_windows >= live.cfg.promote_after_windows:
            live.healthy_windows = 0
            self._spawn(self._auto(live, "advance", verdict))

    async def _auto(self, live: Live, action: str, verdict: Verdict) -> None:
        base = live.state.version
        state = RolloutState.from_dict(live.state.to_dict())
        try:
            if action == "rollback":
                reason = verdict.broken[0]
                state.rollback(reason, verdict.figures)
                log.warning("rollout %s: rolled back (%s broke): %s", live.model,
                            ", ".join(verdict.broken), verdict.figures)
            else:
                reason = "promoted"
                state.advance(live.cfg, reason, verdict.figures)
                log.info("rollout %s: advanced to %s: %s", live.model, state.label(),
                         verdict.figures)
        except MoveRefused:
            return
        try:
            await self._commit(live, state, base)
        except StoreError as exc:
            if action != "rollback":
                raise
            # the safe direction holds here even when it cannot be saved
            log.error("rollout %s: the rollback could not be saved (%s); applied here only",
                      live.model, exc)
            live.state = state
            live.reset()
            self._count(live, state)
            self._show(live)

    async def act(self, model: str, action: str) -> RolloutState:
        """An operator's move (the admin API). Raises KeyError (no such rollout), MoveRefused."""
        live = self.live[model]
        for _ in range(3):  # another process may move it meanwhile (a shared store)
            base = live.state.version
            state = RolloutState.from_dict(live.state.to_dict())
            state.apply(action, live.cfg)
            if await self._commit(live, state, base):
                return live.state
            if (saved := await self.store.load(model)) is not None:
                live.state = saved
        raise MoveRefused("the rollout kept changing under this move; try again")

    async def _commit(self, live: Live, state: RolloutState, base: int) -> bool:
        if live.state.version != base:  # moved meanwhile (a window or the operator)
            return False
        if not await self.store.save(state, base):
            saved = await self.store.load(live.model)
            if saved is not None:
                live.state = saved
                live.reset()
                self._show(live)
            return False
        moved = state.stage != live.state.stage or state.step != live.state.step
        live.state = state
        if moved:
            live.reset()
        self._count(live, state)
        self._show(live)
        return True

    # ---- reads ------------------------------------------------------------------------

    def describe(self, live: Live) -> dict[str, Any]:
        state, cfg = live.state, live.cfg
        return {
            "model": live.model, "primary": live.primary, "candidate": cfg.candidate,
            "stage": state.stage, "step": state.step if state.stage == "canary" else None,
            "share": state.share(cfg), "shadow_share": cfg.shadow_share if state.shadowing(cfg) else 0.0,
            "paused": state.paused, "auto": cfg.auto, "version": state.version,
            "window": {**live.window.figures(), "window_requests": cfg.window_requests,
                       "healthy_windows": live.healthy_windows},
            "last_window": live.last, "report": live.report.table(),
            "history": state.history,
        }

    def _show(self, live: Live) -> None:
        state = live.state
        self.metrics.show(live.model, STAGE_NUMBER[state.stage], state.share(live.cfg),
                          state.paused)

    def _count(self, live: Live, state: RolloutState) -> None:
        if state.history:
            move = state.history[-1]
            self.metrics.moves.labels(live.model, move["action"], move["reason"]).inc()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("rollouts: %s", exc if isinstance(exc, StoreError) else repr(exc))

