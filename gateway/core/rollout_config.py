"""`models[].rollout`: a candidate tier's progressive rollout (shadow, canary steps, full), and
the guards that move it on or roll it back (gateway/rollout/ runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("off", "shadow", "canary", "full")  # what the config may start a rollout at
STICKY_KEYS = ("tenant", "user", "key")


@dataclass(frozen=True)
class RolloutGuards:
    """What a window of candidate requests must hold, compared with the primary's."""

    max_error_rate_delta: float = 0.01  # candidate error rate - primary's
    max_ttft_p95_ratio: float = 1.5  # candidate TTFT p95 / primary's
    min_agreement: float = 0.9  # shadow pairs that agree / pairs compared
    max_kv_bytes_ratio: float = 1.25  # candidate KV bytes per request / primary's

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_rate_delta <= 1:
            raise ValueError("guards.max_error_rate_delta must be in [0, 1]")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("guards.min_agreement must be in [0, 1]")
        if self.max_ttft_p95_ratio <= 0 or self.max_kv_bytes_ratio <= 0:
            raise ValueError("guards.max_ttft_p95_ratio and max_kv_bytes_ratio must be > 0")


@dataclass(frozen=True)
class RolloutConfig:
    candidate: str  # a backend serving the same model (a smaller tier)
    stage: str = "shadow"  # the starting stage (only for a new rollout or a new candidate)
    shadow_share: float = 0.1  # share of the primary's requests also sent to the candidate
    canary_steps: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 1.0)  # live shares, in order
    sticky: str = "user"  # tenant | user | key
    window_requests: int = 200  # candidate requests per evaluation window
    promote_after_windows: int = 2  # healthy windows in a row before the next step
    guards: RolloutGuards = field(default_factory=RolloutGuards)  # any broken: rolled back
    auto: bool = True  # false: only the admin API moves the rollout

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"rollout.stage must be one of {', '.join(STAGES)}")
        if self.sticky not in STICKY_KEYS:
            raise ValueError(f"rollout.sticky must be one of {', '.join(STICKY_KEYS)}")
        if not 0 <= self.shadow_share <= 1:
            raise ValueError("rollout.shadow_share must be in [0, 1]")
        steps = self.canary_steps
        if not steps or any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError("rollout.canary_steps must be increasing shares in (0, 1]")
        if self.window_requests < 1 or self.promote_after_windows < 1:
            raise ValueError("rollout.window_requests and promote_after_windows must be >= 1")
