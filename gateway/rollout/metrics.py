"""The rollouts' Prometheus instruments, on the app's registry (labels: configured models,
fixed outcomes, actions and reasons)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gateway.metrics import GatewayMetrics

SHADOW_OUTCOMES = ("compared", "dropped", "error")
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
AGREEMENT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


class RolloutMetrics:
    def __init__(self, metrics: GatewayMetrics) -> None:
        reg = None if metrics.multiprocess else metrics.registry
        self.stage = Gauge("gateway_rollout_stage",
                           "Rollout stage: 0 off, 1 shadow, 2 canary, 3 full, -1 rolled back.",
                           ("model",), registry=reg, multiprocess_mode="max")
        self.share = Gauge("gateway_rollout_share", "Share of live traffic the candidate serves.",
                           ("model",), registry=reg, multiprocess_mode="max")
        self.paused = Gauge("gateway_rollout_paused", "1 while a rollout's automatic moves are "
                            "paused.", ("model",), registry=reg, multiprocess_mode="max")
        self.shadow = Counter("gateway_shadow_requests_total",
                              "Shadow copies sent to a rollout's candidate, by outcome.",
                              ("model", "outcome"), registry=reg)
        self.agreement = Histogram("gateway_rollout_agreement",
                                   "Agreement score of each shadow pair (1: the same answer).",
                                   ("model",), buckets=AGREEMENT_BUCKETS, registry=reg)
        self.latency_ratio = Histogram("gateway_rollout_latency_ratio",
                                       "Candidate / primary latency of each shadow pair.",
                                       ("model",), buckets=RATIO_BUCKETS, registry=reg)
        self.moves = Counter("gateway_rollout_moves_total", "Rollout moves, by action and reason.",
                             ("model", "action", "reason"), registry=reg)
        self.requests = Counter("gateway_rollout_requests_total",
                                "Requests served under a rollout, by side.",
                                ("model", "side"), registry=reg)

    def show(self, model: str, stage: int, share: float, paused: bool) -> None:
        self.stage.labels(model).set(stage)
        self.share.labels(model).set(share)
        self.paused.labels(model).set(int(paused))
