"""The two dashboards as data: each panel's title, description, unit and PromQL queries.

`generate.py` turns these into Grafana JSON with grafana-foundation-sdk; the observability
test evaluates every query against a real Prometheus scraping a live gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

RATE = "$__rate_interval"


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


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, by: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> tuple[Query, ...]:
    sel = f"{{{selector}}}" if selector else ""
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
              (q("sum by (component) (gateway_memory_bytes)", "{{component}}"),
               q("sum(gateway_memory_measured_bytes)", "measured")), stacked=True),
    PanelSpec("KV cache reserved vs budget",
              "KV bytes reserved by admitted requests (gateway_kv_reserved_bytes) against the "
              "KV budget (gateway_memory_budget_bytes{pool=\"kv\"}).", "bytes",
              (q("sum by (backend) (gateway_kv_reserved_bytes)", "reserved {{backend}}"),
               q('sum by (backend) (gateway_memory_budget_bytes{pool="kv"})', "budget {{backend}}"))),
    PanelSpec("KV headroom",
              "KV budget minus reserved bytes: what the next requests can still reserve.",
              "bytes",
              (q('sum by (backend) (gateway_memory_budget_bytes{pool="kv"}) - '
                 "sum by (backend) (gateway_kv_reserved_bytes)", "{{backend}}"),)),
    PanelSpec("Reserved memory per tenant",
              "KV + adapter bytes held for each tenant (admission ledger; "
              "gateway_memory_reserved_bytes).", "bytes",
              (q("sum by (tenant) (gateway_memory_reserved_bytes)", "{{tenant}}"),), stacked=True),
    PanelSpec("Per-request KV bytes (reserved)",
              "Percentiles of the KV bytes each request reserved (gateway_request_kv_bytes).",
              "bytes", quantiles("gateway_request_kv_bytes", "model", 'measure="reserved"')),
    PanelSpec("Per-request KV bytes (peak used)",
              "Percentiles of the KV bytes each request actually used at its peak.", "bytes",
              quantiles("gateway_request_kv_bytes", "model", 'measure="peak"')),
    PanelSpec("Rejections by policy",
              "Requests a policy rejected (gateway_policy_decisions_total{action=\"reject\"}).",
              "reqps",
              (q(f'sum by (policy) (rate(gateway_policy_decisions_total{{action="reject"}}[{RATE}]))',
                 "{{policy}}"),)),
    PanelSpec("Context trims",
              "Requests context_trim shortened to fit the window and memory share.", "reqps",
              (q("sum(rate(gateway_policy_decisions_total"
                 f'{{policy="context_trim",action="modify"}}[{RATE}]))', "trimmed"),)),
    PanelSpec("Degrades",
              "Requests the degrade policy sent to a smaller tier.", "reqps",
              (q("sum(rate(gateway_policy_decisions_total"
                 f'{{policy="degrade",action="modify"}}[{RATE}]))', "degraded"),)),
    PanelSpec("Refused responses (429 / 503)",
              "Responses with status 429 or 503 (gateway_requests_total).", "reqps",
              (q(f'sum by (status) (rate(gateway_requests_total{{status=~"429|503"}}[{RATE}]))',
                 "{{status}}"),)),
    PanelSpec("Adapter cache events",
              "Adapter loads from storage, hits (already resident) and evictions.", "ops",
              (q(f"sum(rate(gateway_adapter_loads_total[{RATE}]))", "loads"),
               q(f"sum(rate(gateway_adapter_hits_total[{RATE}]))", "hits"),
               q(f"sum(rate(gateway_adapter_evictions_total[{RATE}]))", "evictions"))),
    PanelSpec("Adapter memory vs budget",
              "Bytes of resident adapters against the adapter cache budget.", "bytes",
              (q('sum by (backend) (gateway_memory_bytes{component="adapters"})', "used {{backend}}"),
               q('sum by (backend) (gateway_memory_budget_bytes{pool="adapters"})',
                 "budget {{backend}}"))),
    PanelSpec("GPU memory",
              "GPU memory used and total per device (NVML; absent without a GPU).", "bytes",
              (q("gateway_gpu_memory_used_bytes", "used {{device}}"),
               q("gateway_gpu_memory_total_bytes", "total {{device}}"))),
    PanelSpec("Process memory",
              "Gateway processes' RSS, PSS and swap (summed over workers).", "bytes",
              (q("gateway_process_resident_memory_bytes", "rss"),
               q("gateway_process_pss_bytes", "pss"),
               q("gateway_process_swap_bytes", "swap"))),
    PanelSpec("Major page faults",
              "Major page faults per second (weights paged in from disk, swap-ins).", "ops",
              (q(f"rate(gateway_process_major_page_faults_total[{RATE}])", "faults"),)),
)

TRAFFIC: tuple[PanelSpec, ...] = (
    PanelSpec("Requests by tenant and status",
              "Request rate (gateway_requests_total).", "reqps",
              (q(f"sum by (tenant, status) (rate(gateway_requests_total[{RATE}]))",
                 "{{tenant}} {{status}}"),), stacked=True),
    PanelSpec("Errors by status",
              "4xx and 5xx responses (gateway_requests_total).", "reqps",
              (q(f'sum by (status) (rate(gateway_requests_total{{status=~"4..|5.."}}[{RATE}]))',
                 "{{status}}"),)),
    PanelSpec("Request duration", "Percentiles of the time to the last byte.", "s",
              quantiles("gateway_request_duration_seconds", "model")),
    PanelSpec("Time to first token", "Percentiles of the time to the first generated chunk.", "s",
              quantiles("gateway_time_to_first_token_seconds", "model")),
    PanelSpec("Tokens per second per request",
              "Completion tokens per second of decode time (gateway_tokens_per_second).", "none",
              quantiles("gateway_tokens_per_second", "model", qs=(0.5, 0.95))),
    PanelSpec("Token throughput", "Prompt and completion tokens per second, by tenant.", "none",
              (q(f"sum by (tenant) (rate(gateway_prompt_tokens_total[{RATE}]))", "prompt {{tenant}}"),
               q(f"sum by (tenant) (rate(gateway_completion_tokens_total[{RATE}]))",
                 "completion {{tenant}}"))),
    PanelSpec("Requests in flight", "Requests in flight by tenant.", "none",
              (q("sum by (tenant) (gateway_requests_in_flight)", "{{tenant}}"),), stacked=True),
    PanelSpec("Backend queue and batch", "Requests waiting inside each backend and in its batch.",
              "none",
              (q("sum by (backend) (gateway_queue_depth)", "waiting {{backend}}"),
               q("sum by (backend) (gateway_batch_running)", "running {{backend}}"))),
    PanelSpec("Queue wait", "p95 of the time requests waited, in gateway admission and in the backend.",
              "s", quantiles("gateway_queue_wait_seconds", "stage", qs=(0.5, 0.95))),
    PanelSpec("Context length", "Prompt + completion tokens per request.", "none",
              quantiles("gateway_request_context_tokens", "model", qs=(0.5, 0.95))),
    PanelSpec("Batch size", "Requests in the backend batch when a request got its first token.",
              "none", quantiles("gateway_batch_size", "backend", qs=(0.5, 0.95))),
    PanelSpec("Policy decisions", "Decisions by policy and action.", "ops",
              (q(f"sum by (policy, action) (rate(gateway_policy_decisions_total[{RATE}]))",
                 "{{policy}} {{action}}"),)),
)

DASHBOARDS: dict[str, tuple[str, tuple[PanelSpec, ...]]] = {
    "memgate-memory-slo": ("memgate: memory SLO", MEMORY_SLO),
    "memgate-traffic": ("memgate: traffic", TRAFFIC),
}
