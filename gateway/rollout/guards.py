"""Evaluation windows and the guards, plus the running comparison report.

A window closes after `window_requests` candidate requests: canary requests while the
rollout is in canary, shadow copies while it is in shadow (the candidate serves no client
then). The primary's figures are those of the same period (its requests in canary; the
pairs' primary halves in shadow); where the primary served fewer than half a window in the
period (a canary step of 1.0) the last window where it served more stands in. The agreement guard reads
the shadow pairs compared in the same period (none compared: not measured, it holds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway.core.rollout_config import RolloutGuards
from gateway.rollout.compare import Comparison

MAX_SAMPLES = 10_000  # per side per window (a window_requests above this samples the rest)


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Side:
    """One side's requests in a period: how many, how many failed, TTFTs, KV bytes."""

    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    kv_requests: int = 0  # requests that reported KV bytes

    def add(self, error: bool, ttft: float | None, kv_bytes: int) -> None:
        self.requests += 1
        self.errors += int(error)
        if ttft is not None and len(self.ttfts) < MAX_SAMPLES:
            self.ttfts.append(ttft)
        if kv_bytes > 0:
            self.kv_bytes += kv_bytes
            self.kv_requests += 1

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def kv_per_request(self) -> float | None:
        return self.kv_bytes / self.kv_requests if self.kv_requests else None


@dataclass(frozen=True)
class Verdict:
    figures: dict[str, Any]
    broken: tuple[str, ...]  # guard reasons (gateway/rollout/state.REASONS), in guard order

    @property
    def healthy(self) -> bool:
        return not self.broken


@dataclass
class Window:
    primary: Side = field(default_factory=Side)
    candidate: Side = field(default_factory=Side)
    scores: list[float] = field(default_factory=list)  # shadow pairs' scores

    def pair(self, c: Comparison) -> None:
        if len(self.scores) < MAX_SAMPLES:
            self.scores.append(c.score)

    def figures(self) -> dict[str, Any]:
        return evaluate(self, self.primary, RolloutGuards()).figures


def evaluate(window: Window, baseline: Side, guards: RolloutGuards) -> Verdict:
    """The window's figures against the guards; `baseline`: the primary's side to compare
    with (the window's own, or the last one that had primary requests)."""
    cand = window.candidate
    p_rate, c_rate = baseline.error_rate, cand.error_rate
    delta = c_rate - (p_rate or 0.0) if c_rate is not None else None
    p_ttft, c_ttft = p95(baseline.ttfts), p95(cand.ttfts)
    ttft_ratio = c_ttft / p_ttft if c_ttft is not None and p_ttft else None
    agreement = sum(window.scores) / len(window.scores) if window.scores else None
    p_kv, c_kv = baseline.kv_per_request, cand.kv_per_request
    kv_ratio = c_kv / p_kv if c_kv is not None and p_kv else None
    broken = []
    if delta is not None and delta > guards.max_error_rate_delta:
        broken.append("error_rate")
    if ttft_ratio is not None and ttft_ratio > guards.max_ttft_p95_ratio:
        broken.append("ttft")
    if agreement is not None and agreement < guards.min_agreement:
        broken.append("agreement")
    if kv_ratio is not None and kv_ratio > guards.max_kv_bytes_ratio:
        broken.append("kv_bytes")
    figures = {
        "candidate_requests": cand.requests, "candidate_errors": cand.errors,
        "primary_requests": window.primary.requests, "primary_errors": window.primary.errors,
        "pairs": len(window.scores),
        "error_rate_delta": _round(delta), "ttft_p95_ratio": _round(ttft_ratio),
        "candidate_ttft_p95_s": _round(c_ttft), "primary_ttft_p95_s": _round(p_ttft),
        "agreement": _round(agreement), "kv_bytes_ratio": _round(kv_ratio),
        "candidate_kv_bytes_per_request": _round(c_kv),
        "primary_kv_bytes_per_request": _round(p_kv),
    }
    return Verdict(figures, tuple(broken))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class Report:
    """Every shadow pair compared since the rollout's current candidate started (this
    process): what `gateway rollout report` prints."""

    pairs: int = 0
    greedy: int = 0
    exact: int = 0
    agreement: list[float] = field(default_factory=list)
    token_agreement: list[float] = field(default_factory=list)
    finish_match: int = 0
    length_ratio: list[float] = field(default_factory=list)
    primary_valid: list[bool] = field(default_factory=list)
    candidate_valid: list[bool] = field(default_factory=list)
    tools_match: int = 0
    candidate_errors: int = 0
    ttft_ratio: list[float] = field(default_factory=list)
    latency_ratio: list[float] = field(default_factory=list)
    primary_kv: Side = field(default_factory=Side)
    candidate_kv: Side = field(default_factory=Side)

    def add(self, c: Comparison) -> None:
        if self.pairs >= MAX_SAMPLES:
            return
        self.pairs += 1
        self.greedy += int(c.greedy)
        self.exact += int(c.exact)
        self.agreement.append(c.score)
        if c.token_agreement is not None:
            self.token_agreement.append(c.token_agreement)
        self.finish_match += int(c.finish_match)
        if c.length_ratio is not None:
            self.length_ratio.append(c.length_ratio)
        if c.primary_valid is not None:
            self.primary_valid.append(c.primary_valid)
        if c.candidate_valid is not None:
            self.candidate_valid.append(c.candidate_valid)
        self.tools_match += int(c.tools_match)
        self.candidate_errors += int(c.candidate_error is not None)
        if c.ttft_ratio is not None:
            self.ttft_ratio.append(c.ttft_ratio)
        if c.latency_ratio is not None:
            self.latency_ratio.append(c.latency_ratio)
        self.primary_kv.add(False, None, c.primary_kv_bytes)
        self.candidate_kv.add(False, None, c.candidate_kv_bytes)

    def table(self) -> dict[str, Any]:
        def share(n: int) -> float | None:
            return round(n / self.pairs, 4) if self.pairs else None

        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 4) if xs else None

        def rate(xs: list[bool]) -> float | None:
            return round(sum(xs) / len(xs), 4) if xs else None

        p_kv, c_kv = self.primary_kv.kv_per_request, self.candidate_kv.kv_per_request
        return {
            "pairs": self.pairs, "greedy_pairs": self.greedy,
            "exact_match": share(self.exact) if self.greedy else None,
            "token_agreement": mean(self.token_agreement),
            "agreement": mean(self.agreement),
            "finish_reason_match": share(self.finish_match),
            "length_ratio_mean": mean(self.length_ratio),
            "json_tool_valid_primary": rate(self.primary_valid),
            "json_tool_valid_candidate": rate(self.candidate_valid),
            "tool_names_match": share(self.tools_match),
            "candidate_error_rate": share(self.candidate_errors),
            "ttft_ratio_median": _round(median(self.ttft_ratio)),
            "latency_ratio_median": _round(median(self.latency_ratio)),
            "primary_kv_bytes_per_request": _round(p_kv),
            "candidate_kv_bytes_per_request": _round(c_kv),
            "kv_bytes_ratio": _round(c_kv / p_kv) if c_kv is not None and p_kv else None,
        }
