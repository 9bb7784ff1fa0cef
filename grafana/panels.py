"""The two dashboards as data: each panel's title, description, unit and PromQL queries, and
the variables every dashboard has.

`generate.py` turns these into Grafana JSON with grafana-foundation-sdk; the observability
test evaluates every query, its variables substituted, against a real Prometheus scraping a
live gateway.

Every query selects `job=~"$job", instance=~"$instance"` (and `$tenant` / `$model` where the
metric has those labels). Panels whose values belong to one process (memory, KV budgets,
process metrics, the config version) keep `instance` (and `pid` under `--workers N`) in their
legend, so several gateways are never summed into one line that exists nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

RATE = "$__rate_interval"
INST = 'job=~"$job",instance=~"$instance"'
TENANT = f'{INST},tenant=~"$tenant"'
MODEL = f'{INST},model=~"$model"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    stacked: bool = False
    row: str = ""  # a dashboard row this panel opens or belongs to ("": none)


@dataclass(frozen=True)
class Variable:
    """A query variable: its values are `label` of `metric` (multi-select, "All" = .*)."""

    name: str
    metric: str
    label: str
    depends: str = ""  # the selector of the variables it depends on


# Each from a metric every gateway exports from its start (or its first request, for model).
VARIABLES: tuple[Variable, ...] = (
    Variable("job", "gateway_config_info", "job"),
    Variable("instance", "gateway_config_info", "instance", 'job=~"$job"'),
    Variable("tenant", "gateway_requests_in_flight", "tenant", INST),
    Variable("model", "gateway_requests_total", "model", INST),
)


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, by: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99),
              base: str = INST) -> tuple[Query, ...]:
    sel = f"{{{base},{selector}}}" if selector else f"{{{base}}}"
    return tuple(
        q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{sel}[{RATE}])))",
          f"p{round(p * 100)} {{{{{by}}}}}")
        for p in qs
    )


MEMORY_SLO: tuple[PanelSpec, ...] = (
    PanelSpec("Memory by component vs measured",
              "Backend memory by component (gateway_memory_bytes), stacked; the line is what "
              "the OS/GPU measures (gateway_memory_measured_bytes). `other` is the unexplained rest.",
              "bytes",
              (q(f"sum by (instance, component) (gateway_memory_bytes{{{INST}}})",
                 "{{instance}} {{component}}"),
               q(f"sum by (instance) (gateway_memory_measured_bytes{{{INST}}})",
                 "{{instance}} measured")), stacked=True),
    PanelSpec("KV cache reserved vs budget",
              "KV bytes reserved by admitted requests (gateway_kv_reserved_bytes) against the "
              "KV budget (gateway_memory_budget_bytes{pool=\"kv\"}).", "bytes",
              (q(f"sum by (instance, backend) (gateway_kv_reserved_bytes{{{INST}}})",
                 "reserved {{instance}} {{backend}}"),
               q(f'sum by (instance, backend) (gateway_memory_budget_bytes{{{INST},pool="kv"}})',
                 "budget {{instance}} {{backend}}"))),
    PanelSpec("KV headroom",
              "KV budget minus reserved bytes: what the next requests can still reserve.",
              "bytes",
              (q(f'sum by (instance, backend) (gateway_memory_budget_bytes{{{INST},pool="kv"}}) - '
                 f"sum by (instance, backend) (gateway_kv_reserved_bytes{{{INST}}})",
                 "{{instance}} {{backend}}"),)),
    PanelSpec("Reserved memory per tenant",
              "KV + adapter bytes held for each tenant (admission ledger; "
              "gateway_memory_reserved_bytes).", "bytes",
              (q(f"sum by (tenant) (gateway_memory_reserved_bytes{{{TENANT}}})", "{{tenant}}"),),
              stacked=True),
    PanelSpec("Per-request KV bytes (reserved)",
              "Percentiles of the KV bytes each request reserved (gateway_request_kv_bytes).",
              "bytes", quantiles("gateway_request_kv_bytes", "model", 'measure="reserved"',
                                 base=MODEL)),
    PanelSpec("Per-request KV bytes (peak used)",
              "Percentiles of the KV bytes each request actually used at its peak.", "bytes",
              quantiles("gateway_request_kv_bytes", "model", 'measure="peak"', base=MODEL)),
    PanelSpec("Rejections by policy",
              "Requests a policy rejected (gateway_policy_decisions_total{action=\"reject\"}).",
              "reqps",
              (q(f'sum by (policy) (rate(gateway_policy_decisions_total{{{INST},action="reject"}}'
                 f"[{RATE}]))", "{{policy}}"),)),
    PanelSpec("Context trims",
              "Requests context_trim shortened to fit the window and memory share.", "reqps",
              (q("sum(rate(gateway_policy_decisions_total"
                 f'{{{INST},policy="context_trim",action="modify"}}[{RATE}]))', "trimmed"),)),
    PanelSpec("Degrades",
              "Requests the degrade policy sent to a smaller tier.", "reqps",
              (q("sum(rate(gateway_policy_decisions_total"
                 f'{{{INST},policy="degrade",action="modify"}}[{RATE}]))', "degraded"),)),
    PanelSpec("Refused responses (429 / 503)",
              "Responses with status 429 or 503 (gateway_requests_total).", "reqps",
              (q(f'sum by (status) (rate(gateway_requests_total{{{TENANT},status=~"429|503"}}'
                 f"[{RATE}]))", "{{status}}"),)),
    PanelSpec("Adapter cache events",
              "Adapter loads from storage, hits (already resident) and evictions.", "ops",
              (q(f"sum by (instance) (rate(gateway_adapter_loads_total{{{INST}}}[{RATE}]))",
                 "loads {{instance}}"),
               q(f"sum by (instance) (rate(gateway_adapter_hits_total{{{INST}}}[{RATE}]))",
                 "hits {{instance}}"),
               q(f"sum by (instance) (rate(gateway_adapter_evictions_total{{{INST}}}[{RATE}]))",
                 "evictions {{instance}}"))),
    PanelSpec("Adapter memory vs budget",
              "Bytes of resident adapters against the adapter cache budget.", "bytes",
              (q(f'sum by (instance, backend) (gateway_memory_bytes{{{INST},component="adapters"}})',
                 "used {{instance}} {{backend}}"),
               q(f'sum by (instance, backend) (gateway_memory_budget_bytes{{{INST},pool="adapters"}})',
                 "budget {{instance}} {{backend}}"))),
    PanelSpec("GPU memory",
              "GPU memory used and total per device (NVML; absent without a GPU).", "bytes",
              (q(f"gateway_gpu_memory_used_bytes{{{INST}}}", "used {{instance}} {{device}}"),
               q(f"gateway_gpu_memory_total_bytes{{{INST}}}", "total {{instance}} {{device}}"))),
    PanelSpec("Process memory",
              "Each gateway's RSS, PSS and swap (summed over its workers).", "bytes",
              (q(f"gateway_process_resident_memory_bytes{{{INST}}}", "rss {{instance}}"),
               q(f"gateway_process_pss_bytes{{{INST}}}", "pss {{instance}}"),
               q(f"gateway_process_swap_bytes{{{INST}}}", "swap {{instance}}"))),
    PanelSpec("Major page faults",
              "Major page faults per second (weights paged in from disk, swap-ins).", "ops",
              (q(f"rate(gateway_process_major_page_faults_total{{{INST}}}[{RATE}])",
                 "{{instance}}"),)),
)

TRAFFIC: tuple[PanelSpec, ...] = (
    PanelSpec("Requests by tenant and status",
              "Request rate (gateway_requests_total).", "reqps",
              (q(f"sum by (tenant, status) (rate(gateway_requests_total{{{TENANT}}}[{RATE}]))",
                 "{{tenant}} {{status}}"),), stacked=True),
    PanelSpec("Errors by status",
              "4xx and 5xx responses (gateway_requests_total).", "reqps",
              (q(f'sum by (status) (rate(gateway_requests_total{{{TENANT},status=~"4..|5.."}}'
                 f"[{RATE}]))", "{{status}}"),)),
    PanelSpec("Request duration", "Percentiles of the time to the last byte.", "s",
              quantiles("gateway_request_duration_seconds", "model", base=MODEL)),
    PanelSpec("Time to first token", "Percentiles of the time to the first generated chunk.", "s",
              quantiles("gateway_time_to_first_token_seconds", "model", base=MODEL)),
    PanelSpec("Tokens per second per request",
              "Completion tokens per second of decode time (gateway_tokens_per_second).", "none",
              quantiles("gateway_tokens_per_second", "model", qs=(0.5, 0.95), base=MODEL)),
    PanelSpec("Token throughput", "Prompt and completion tokens per second, by tenant.", "none",
              (q(f"sum by (tenant) (rate(gateway_prompt_tokens_total{{{TENANT}}}[{RATE}]))",
                 "prompt {{tenant}}"),
               q(f"sum by (tenant) (rate(gateway_completion_tokens_total{{{TENANT}}}[{RATE}]))",
                 "completion {{tenant}}"))),
    PanelSpec("Requests in flight", "Requests in flight by tenant.", "none",
              (q(f"sum by (tenant) (gateway_requests_in_flight{{{TENANT}}})", "{{tenant}}"),),
              stacked=True),
    PanelSpec("Backend queue and batch", "Requests waiting inside each backend and in its batch.",
              "none",
              (q(f"sum by (instance, backend) (gateway_queue_depth{{{INST}}})",
                 "waiting {{instance}} {{backend}}"),
               q(f"sum by (instance, backend) (gateway_batch_running{{{INST}}})",
                 "running {{instance}} {{backend}}"))),
    PanelSpec("Queue wait", "p95 of the time requests waited, in gateway admission and in the backend.",
              "s", quantiles("gateway_queue_wait_seconds", "stage", qs=(0.5, 0.95), base=MODEL)),
    PanelSpec("Context length", "Prompt + completion tokens per request.", "none",
              quantiles("gateway_request_context_tokens", "model", qs=(0.5, 0.95), base=MODEL)),
    PanelSpec("Batch size", "Requests in the backend batch when a request got its first token.",
              "none", quantiles("gateway_batch_size", "backend", qs=(0.5, 0.95))),
    PanelSpec("Policy decisions", "Decisions by policy and action.", "ops",
              (q(f"sum by (policy, action) (rate(gateway_policy_decisions_total{{{INST}}}[{RATE}]))",
                 "{{policy}} {{action}}"),)),
    # -- operations
    PanelSpec("Config reloads",
              "Config reloads by result (gateway_config_reloads_total): ok, unchanged, and the "
              "refused ones (invalid file, a backend that could not start).", "ops",
              (q(f"sum by (instance, result) (increase(gateway_config_reloads_total{{{INST}}}[{RATE}]))",
                 "{{instance}} {{result}}"),)),
    PanelSpec("Config version per worker",
              "The config version each gateway worker serves (gateway_config_info == 1); after a "
              "reload every worker should show the same one.", "none",
              (q(f"gateway_config_info{{{INST}}} == 1", "{{instance}} {{pid}} {{version}}"),)),
    PanelSpec("Upstream retries and failures",
              "Retries of calls to upstream backends, and failures (connect errors, timeouts, 5xx).",
              "ops",
              (q(f"sum by (instance, backend) (rate(gateway_upstream_retries_total{{{INST}}}[{RATE}]))",
                 "retries {{instance}} {{backend}}"),
               q(f"sum by (instance, backend) (rate(gateway_upstream_failures_total{{{INST}}}[{RATE}]))",
                 "failures {{instance}} {{backend}}"))),
    PanelSpec("Backends in rotation",
              "1 while a backend is in rotation; 0 while it is out after failures, until its "
              "re-probe passes (gateway_backend_available).", "none",
              (q(f"min by (instance, backend) (gateway_backend_available{{{INST}}})",
                 "{{instance}} {{backend}}"),)),
    PanelSpec("Gateway CPU per worker",
              "CPU seconds per second of each gateway process (process_cpu_seconds_total; under "
              "--workers N one line per worker pid).", "percentunit",
              (q(f'rate(process_cpu_seconds_total{{{INST}}}[{RATE}])', "{{instance}} {{pid}}"),)),
    # -- rollouts: the Rollouts row
    PanelSpec("Rollouts: stage and candidate share",
              "Each rollout's stage (gateway_rollout_stage: 0 off, 1 shadow, 2 canary, 3 full, "
              "-1 rolled back) and the share of live traffic its candidate serves "
              "(gateway_rollout_share).", "none",
              (q(f"max by (model) (gateway_rollout_stage{{{MODEL}}})", "stage {{model}}"),
               q(f"max by (model) (gateway_rollout_share{{{MODEL}}})", "share {{model}}")),
              row="Rollouts"),
    PanelSpec("Rollouts: shadow copies",
              "Shadow copies sent to each rollout's candidate, by outcome: compared, dropped (no "
              "spare room: never queued) and error (gateway_shadow_requests_total).", "ops",
              (q(f"sum by (model, outcome) (rate(gateway_shadow_requests_total{{{MODEL}}}[{RATE}]))",
                 "{{model}} {{outcome}}"),), row="Rollouts"),
    PanelSpec("Rollouts: shadow agreement",
              "Agreement score of the shadow pairs (1: the candidate answered as the primary did; "
              "gateway_rollout_agreement): the min_agreement guard reads its window mean.", "none",
              quantiles("gateway_rollout_agreement", "model", qs=(0.05, 0.5), base=MODEL),
              row="Rollouts"),
    PanelSpec("Rollouts: shadow latency ratio",
              "Candidate / primary latency of each shadow pair (gateway_rollout_latency_ratio).",
              "none", quantiles("gateway_rollout_latency_ratio", "model", qs=(0.5, 0.95),
                                base=MODEL), row="Rollouts"),
    PanelSpec("Rollouts: moves",
              "Rollout moves by action and reason (gateway_rollout_moves_total): a guard's "
              "rollback (error_rate, ttft, agreement, kv_bytes), promoted, operator, config.",
              "none",
              (q(f"sum by (model, action, reason) (increase(gateway_rollout_moves_total{{{MODEL}}}"
                 f"[{RATE}]))", "{{model}} {{action}} {{reason}}"),), row="Rollouts"),
)

DASHBOARDS: dict[str, tuple[str, tuple[PanelSpec, ...]]] = {
    "memgate-memory-slo": ("memgate: memory SLO", MEMORY_SLO),
    "memgate-traffic": ("memgate: traffic", TRAFFIC),
}
