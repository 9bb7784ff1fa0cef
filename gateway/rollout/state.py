"""One rollout's live state and its moves: the stage (off, shadow, canary at step i, full,
rolled_back), the pause flag, and the history of moves with their reasons.

The config's `stage` starts a rollout; from then on the state is what the guards and the
operator made of it (gateway/rollout/store.py keeps it across reloads and restarts)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.core.rollout_config import RolloutConfig

LIVE_STAGES = ("off", "shadow", "canary", "full", "rolled_back")
STAGE_NUMBER = {"off": 0, "shadow": 1, "canary": 2, "full": 3, "rolled_back": -1}
ACTIONS = ("advance", "rollback", "pause", "resume", "promote")
# gateway_rollout_moves_total{reason}: each guard, the operator, promoted (the guards'
# healthy windows), config (a new rollout or candidate)
REASONS = ("error_rate", "ttft", "agreement", "kv_bytes", "operator", "promoted", "config")
MAX_HISTORY = 50


class MoveRefused(ValueError):
    """An operator's move that does not apply to the rollout's stage (a 409)."""


@dataclass
class RolloutState:
    model: str
    candidate: str
    stage: str = "off"
    step: int = 0  # the canary step (an index of canary_steps) while stage is canary
    paused: bool = False
    version: int = 0  # bumped by every change (a shared store's compare-and-set)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, model: str, cfg: RolloutConfig) -> RolloutState:
        state = cls(model=model, candidate=cfg.candidate, stage=cfg.stage)
        state._record("start", "config", "new", cfg.stage, None)
        return state

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        stage = str(data.get("stage", "off"))
        if stage not in LIVE_STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        history = data.get("history") or []
        return cls(model=str(data["model"]), candidate=str(data["candidate"]), stage=stage,
                   step=int(data.get("step", 0)), paused=bool(data.get("paused", False)),
                   version=int(data.get("version", 0)),
                   history=[dict(h) for h in history if isinstance(h, dict)][-MAX_HISTORY:])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def share(self, cfg: RolloutConfig) -> float:
        """The share of live traffic the candidate serves."""
        if self.stage == "full":
            return 1.0
        if self.stage == "canary":
            return cfg.canary_steps[min(self.step, len(cfg.canary_steps) - 1)]
        return 0.0

    def shadowing(self, cfg: RolloutConfig) -> bool:
        return self.stage in ("shadow", "canary") and cfg.shadow_share > 0

    def label(self) -> str:
        return f"canary[{self.step}]" if self.stage == "canary" else self.stage

    # ---- moves --------------------------------------------------------------------------

    def advance(self, cfg: RolloutConfig, reason: str,
                figures: dict[str, Any] | None = None) -> None:
        """The next stage: off/rolled_back -> shadow -> canary steps -> full."""
        before = self.label()
        if self.stage in ("off", "rolled_back"):
            self.stage, self.step = "shadow", 0
        elif self.stage == "shadow":
            self.stage, self.step = "canary", 0
        elif self.stage == "canary" and self.step + 1 < len(cfg.canary_steps):
            self.step += 1
        elif self.stage == "canary":
            self.stage, self.step = "full", 0
        else:
            raise MoveRefused("the rollout is already full")
        self._record("advance", reason, before, self.label(), figures)

    def rollback(self, reason: str, figures: dict[str, Any] | None = None) -> None:
        if self.stage == "rolled_back":
            raise MoveRefused("the rollout is already rolled back")
        before = self.label()
        self.stage, self.step = "rolled_back", 0
        self._record("rollback", reason, before, self.label(), figures)

    def promote(self, reason: str) -> None:
        if self.stage == "full":
            raise MoveRefused("the rollout is already full")
        before = self.label()
        self.stage, self.step = "full", 0
        self._record("promote", reason, before, self.label(), None)

    def set_paused(self, paused: bool) -> None:
        if self.paused == paused:
            raise MoveRefused(f"the rollout is already {'paused' if paused else 'running'}")
        self.paused = paused
        self._record("pause" if paused else "resume", "operator", self.label(), self.label(),
                     None)

    def apply(self, action: str, cfg: RolloutConfig) -> None:
        """An operator's action (POST /admin/rollouts/{model})."""
        if action == "advance":
            self.advance(cfg, "operator")
        elif action == "rollback":
            self.rollback("operator")
        elif action == "promote":
            self.promote("operator")
        elif action in ("pause", "resume"):
            self.set_paused(action == "pause")
        else:
            raise MoveRefused(f"unknown action {action!r}")

    def _record(self, action: str, reason: str, before: str, after: str,
                figures: dict[str, Any] | None) -> None:
        self.version += 1
        entry: dict[str, Any] = {"time": round(time.time(), 3), "action": action,
                                 "reason": reason, "from": before, "to": after}
        if figures:
            entry["figures"] = figures
        self.history.append(entry)
        del self.history[:-MAX_HISTORY]


def reconcile(saved: RolloutState | None, model: str, cfg: RolloutConfig) -> RolloutState:
    """The state a config's rollout runs under: the saved one, unless the rollout is new or
    its candidate changed (then the config's stage starts it afresh)."""
    if saved is not None and saved.candidate == cfg.candidate:
        return saved
    state = RolloutState.start(model, cfg)
    if saved is not None:
        state.version = saved.version + 1
        state.history = [*saved.history, *state.history][-MAX_HISTORY:]
    return state
