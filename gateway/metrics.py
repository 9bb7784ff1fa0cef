"""Prometheus metrics: one registry per app, the request-path instruments, and exposition.

Label values come only from bounded sets: configured tenants and models, backends, policy
names, decision actions, HTTP status codes. Nothing from a request body or header.

Multi-worker mode (`gateway serve --workers N`): the CLI sets PROMETHEUS_MULTIPROC_DIR before
the workers start; each worker then writes its values to files there and any worker's
/metrics aggregates all of them (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

NONE = "none"  # the label value where a request ended before its tenant or model was known
RELOAD_RESULTS = ("ok", "unchanged", "invalid", "failed")  # gateway_config_reloads_total{result}

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTE_BUCKETS = tuple(float(2**p) for p in range(14, 37, 2))  # 16 KiB .. 64 GiB
# OpenTelemetry GenAI metrics: the bucket boundaries the semantic conventions advise
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                          20.48, 40.96, 81.92)
GENAI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                      2.5, 5.0, 7.5, 10.0)
GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
GENAI_TOKEN_BUCKETS = tuple(float(4**p) for p in range(0, 14))  # 1 .. 67,108,864


def standard_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    """prometheus_client's process_*, python_info and python_gc_* collectors, on `registry`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass(slots=True)
class RequestObservation:
    """What one finished request contributes to the metrics (all bounded labels)."""

    tenant: str
    model: str
    backend: str
    status: str
    duration: float
    ttft: float | None = None
    tokens_per_second: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gateway_queue_seconds: float | None = None
    backend_queue_seconds: float | None = None
    kv_bytes_reserved: int = 0
    kv_bytes_peak: int = 0
    context_tokens: int = 0
    batch_size: int | None = None
    # completion tokens minus what admission expected (its estimate x sequences), when it had one
    estimate_error_tokens: int | None = None
    decisions: Sequence[tuple[str, str]] = ()
    # OpenTelemetry GenAI metrics: operation (chat / text_completion), the model that answered,
    # the provider of the upstream call (None: the local engine, no client call), per-token time
    operation: str = ""
    response_model: str = ""
    provider: str | None = None
    upstream_seconds: float | None = None
    time_per_output_token: float | None = None


def _fast_observe(child: Any) -> Callable[[float], None]:
    """Histogram.observe of one labelled child, with a binary search for the bucket instead of
    prometheus_client's linear scan (same bucket: the first upper bound >= the value). Falls
    back to child.observe where the client's internals differ."""
    try:
        bounds, buckets, total = list(child._upper_bounds), child._buckets, child._sum
    except AttributeError:
        return child.observe  # type: ignore[no-any-return]
    if len(bounds) != len(buckets) or not hasattr(total, "inc"):
        return child.observe  # type: ignore[no-any-return]

    def observe(value: float) -> None:
        total.inc(value)
        i = bisect_left(bounds, value)
        if i < len(buckets):
            buckets[i].inc(1)

    return observe


class GatewayMetrics:
    """The instruments of one app. Hot-path cost: a few dict lookups and float adds."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode values live in files, not in a registry: the exposition
        # registry is built at scrape time around a MultiProcessCollector.
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess else self.registry
        if reg is not None:  # multi-worker: published per worker (gateway/memory_collector.py)
            standard_collectors(reg)
        tm = ("tenant", "model")
        self.requests = Counter("gateway_requests", "Requests answered, by HTTP status.",
                                (*tm, "status"), registry=reg)
        self.duration = Histogram("gateway_request_duration_seconds",
                                  "Time from request start to the last response byte.", tm,
                                  buckets=LATENCY_BUCKETS, registry=reg)
        self.ttft = Histogram("gateway_time_to_first_token_seconds",
                              "Time from request start to the first generated chunk.", tm,
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.tps = Histogram("gateway_tokens_per_second",
                             "Completion tokens per second of decode time, per request.", tm,
                             buckets=RATE_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens processed.", tm,
                                     registry=reg)
        self.completion_tokens = Counter("gateway_completion_tokens",
                                         "Completion tokens generated.", tm, registry=reg)
        self.queue_wait = Histogram("gateway_queue_wait_seconds",
                                    "Time a request waited: in gateway admission or in the backend.",
                                    ("model", "stage"), buckets=LATENCY_BUCKETS, registry=reg)
        self.kv_bytes = Histogram("gateway_request_kv_bytes",
                                  "KV cache bytes per request: reserved, and peak used.",
                                  ("model", "measure"), buckets=BYTE_BUCKETS, registry=reg)
        self.context = Histogram("gateway_request_context_tokens",
                                 "Prompt + completion tokens per request.", ("model",),
                                 buckets=TOKEN_BUCKETS, registry=reg)
        self.estimate_error = Histogram(
            "gateway_output_estimate_error_tokens",
            "How far a request's completion tokens were from admission's estimate: under "
            "(longer than expected: the engine may have preempted) or over.",
            ("model", "direction"), buckets=TOKEN_BUCKETS, registry=reg)
        self.batch = Histogram("gateway_batch_size",
                               "Requests in the backend batch when a request got its first token.",
                               ("backend",), buckets=BATCH_BUCKETS, registry=reg)
        self.decisions = Counter("gateway_policy_decisions", "Policy decisions, by action.",
                                 ("policy", "action"), registry=reg)
        self.backend_errors = Counter(  # code: a BackendError code (a constant in our code)
            "gateway_backend_errors", "Backend failures, before or after the first byte.",
            ("backend", "code", "phase"), registry=reg)
        # -- OpenTelemetry GenAI metrics (semantic conventions; names as OTLP -> Prometheus
        # writes them): the server side for every request, the client side for upstream calls
        server = ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model")
        self.genai_duration = Histogram(
            "gen_ai_server_request_duration_seconds", "GenAI server request duration.",
            (*server, "error_type"), buckets=GENAI_DURATION_BUCKETS, registry=reg)
        self.genai_ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "GenAI time to the first output token.",
            server, buckets=GENAI_TTFT_BUCKETS, registry=reg)
        self.genai_tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "GenAI time per output token after the first.", server,
            buckets=GENAI_TPOT_BUCKETS, registry=reg)
        client = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
        self.genai_client_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI client (upstream) call duration.",
            (*client, "error_type"), buckets=GENAI_DURATION_BUCKETS, registry=reg)
        self.genai_client_tokens = Histogram(
            "gen_ai_client_token_usage", "GenAI tokens per upstream call, by type.",
            (*client, "gen_ai_token_type"), buckets=GENAI_TOKEN_BUCKETS, registry=reg)
        # -- operations: config reloads; the version each worker serves
        self.config_reloads = Counter("gateway_config_reloads", "Config reloads, by result.",
                                      ("result",), registry=reg)
        self.config_info = Gauge("gateway_config_info",
                                 "1 for the config version this worker serves (0: one it served).",
                                 ("version",), registry=reg, multiprocess_mode="liveall")
        for result in RELOAD_RESULTS:  # every result exported from the start, at 0
            self.config_reloads.labels(result)
        self.config_reload_ok = Gauge("gateway_config_last_reload_successful",
                                      "1 unless the last reload was refused.", registry=reg,
                                      multiprocess_mode="livemin")
        # Labelled children, cached: labels() costs a lock and a few checks per call.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._genai_fns: dict[tuple[str, str, str, str, str | None], tuple[Any, ...]] = {}

    def _hist(self, metric: Any, *labels: str) -> Callable[[float], None]:
        """The observe() of metric.labels(*labels), looked up once: labels() takes a lock and
        checks the values on each call. Every label set here is bounded (module docstring),
        and a child is created only when first observed, so the exposition is unchanged."""
        key = (id(metric), labels)
        fn = self._children.get(key)
        if fn is None:
            fn = self._children[key] = _fast_observe(metric.labels(*labels))
        return fn

    def _count(self, metric: Any, *labels: str) -> Callable[[float], None]:
        """The inc() of metric.labels(*labels), looked up once (amounts here are >= 0)."""
        key = (id(metric), labels)
        fn = self._children.get(key)
        if fn is None:
            child = metric.labels(*labels)
            value = getattr(child, "_value", None)
            inc: Callable[[float], None] = value.inc if value is not None and hasattr(value, "inc") else child.inc
            fn = self._children[key] = inc
        return fn

    def observe(self, o: RequestObservation) -> None:
        hist, count = self._hist, self._count
        tenant, model = o.tenant, o.model
        count(self.requests, tenant, model, o.status)(1)
        hist(self.duration, tenant, model)(o.duration)
        for policy, action in o.decisions:
            count(self.decisions, policy, action)(1)
        if model == NONE:
            return
        if o.ttft is not None:
            hist(self.ttft, tenant, model)(o.ttft)
        if o.tokens_per_second is not None:
            hist(self.tps, tenant, model)(o.tokens_per_second)
        if o.prompt_tokens:
            count(self.prompt_tokens, tenant, model)(o.prompt_tokens)
        if o.completion_tokens:
            count(self.completion_tokens, tenant, model)(o.completion_tokens)
        if o.gateway_queue_seconds is not None:
            hist(self.queue_wait, model, "gateway")(o.gateway_queue_seconds)
        if o.backend_queue_seconds is not None:
            hist(self.queue_wait, model, "backend")(o.backend_queue_seconds)
        if o.kv_bytes_reserved:
            hist(self.kv_bytes, model, "reserved")(o.kv_bytes_reserved)
        if o.kv_bytes_peak:
            hist(self.kv_bytes, model, "peak")(o.kv_bytes_peak)
        if o.context_tokens:
            hist(self.context, model)(o.context_tokens)
        if o.batch_size is not None:
            hist(self.batch, o.backend)(o.batch_size)
        if o.estimate_error_tokens is not None:
            e = o.estimate_error_tokens
            hist(self.estimate_error, model, "under" if e > 0 else "over")(abs(e))
        self._genai(o)

    def _genai(self, o: RequestObservation) -> None:
        """The GenAI histograms of one request; their observe() functions are looked up once
        per (operation, models, status, provider): one dict lookup per request."""
        key = (o.operation, o.model, o.response_model, o.status, o.provider)
        fns = self._genai_fns.get(key)
        if fns is None:
            fns = self._genai_fns[key] = self._genai_children(*key)
        duration, ttft, tpot, client, tokens_in, tokens_out = fns
        duration(o.duration)
        if o.ttft is not None:
            ttft(o.ttft)
        if o.time_per_output_token is not None:
            tpot(o.time_per_output_token)
        if client is not None and o.upstream_seconds is not None:
            client(o.upstream_seconds)
            if o.prompt_tokens and tokens_in is not None:
                tokens_in(o.prompt_tokens)
            if o.completion_tokens and tokens_out is not None:
                tokens_out(o.completion_tokens)

    def _genai_children(self, op: str, asked: str, answered: str, status: str,
                        provider: str | None) -> tuple[Any, ...]:
        hist = self._hist
        error = status if status[0] in "45" else ""
        server = (hist(self.genai_duration, op, asked, answered, error),
                  hist(self.genai_ttft, op, asked, answered),
                  hist(self.genai_tpot, op, asked, answered))
        if provider is None:
            return (*server, None, None, None)
        return (*server, hist(self.genai_client_duration, op, provider, answered, error),
                hist(self.genai_client_tokens, op, provider, answered, "input"),
                hist(self.genai_client_tokens, op, provider, answered, "output"))

    def config_loaded(self, version: str, previous: str | None) -> None:
        """This worker now serves `version` (gateway_config_info)."""
        if previous is None:
            self.config_reload_ok.set(1)
        elif previous != version:
            self.config_info.labels(previous).set(0)
        self.config_info.labels(version).set(1)

    def reloaded(self, result: str) -> None:
        self.config_reloads.labels(result).inc()
        self.config_reload_ok.set(0 if result in ("invalid", "failed") else 1)

    def exposition(self) -> bytes:
        """The text format: every worker's instruments plus the scrape-time collectors."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def worker_versions() -> dict[str, str]:
    """Multi-worker mode: the config version each live worker serves (gateway_config_info
    in the shared multiprocess directory; a pid whose process is gone is left out)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    out: dict[str, str] = {}
    for family in registry.collect():
        if family.name != "gateway_config_info":
            continue
        for sample in family.samples:
            pid = sample.labels.get("pid", "")
            if sample.value == 1 and pid.isdigit() and _alive(int(pid)):
                out[pid] = sample.labels["version"]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
