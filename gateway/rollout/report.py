"""`gateway rollout report MODEL`: a running gateway's rollout (GET /admin/rollouts) as a
table: stage, share, the comparison of every shadow pair so far, the windows, the moves."""

from __future__ import annotations

from typing import Any

import httpx

ROWS = (
    ("pairs", "shadow pairs compared"),
    ("greedy_pairs", "greedy pairs"),
    ("exact_match", "exact match (greedy)"),
    ("token_agreement", "token agreement (greedy)"),
    ("agreement", "agreement score"),
    ("finish_reason_match", "finish reason match"),
    ("length_ratio_mean", "length ratio (cand/prim)"),
    ("json_tool_valid_primary", "JSON/tool valid: primary"),
    ("json_tool_valid_candidate", "JSON/tool valid: candidate"),
    ("tool_names_match", "tool names match"),
    ("candidate_error_rate", "candidate error rate"),
    ("ttft_ratio_median", "TTFT ratio (median)"),
    ("latency_ratio_median", "latency ratio (median)"),
    ("primary_kv_bytes_per_request", "KV bytes/request: primary"),
    ("candidate_kv_bytes_per_request", "KV bytes/request: candidate"),
    ("kv_bytes_ratio", "KV bytes ratio"),
)


class ReportError(Exception):
    """The gateway could not be asked, or has no such rollout."""


def fetch_report(url: str, model: str, admin_key: str) -> str:
    try:
        r = httpx.get(url.rstrip("/").removesuffix("/v1") + "/admin/rollouts",
                      headers={"authorization": f"Bearer {admin_key}"}, timeout=10)
    except httpx.HTTPError as exc:
        raise ReportError(f"cannot reach {url}: {type(exc).__name__}") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {r.status_code}"
        raise ReportError(message)
    for rollout in r.json().get("data", []):
        if rollout.get("model") == model:
            return render(rollout)
    raise ReportError(f"no rollout for model {model!r}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def render(rollout: dict[str, Any]) -> str:
    step = f" step {rollout['step']}" if rollout.get("step") is not None else ""
    lines = [f"rollout {rollout['model']}: {rollout['primary']} -> {rollout['candidate']}",
             f"stage {rollout['stage']}{step}, share {rollout['share']:.3g}, shadow share "
             f"{rollout['shadow_share']:.3g}{', paused' if rollout.get('paused') else ''}"
             f"{', manual' if not rollout.get('auto', True) else ''}", ""]
    report = rollout.get("report") or {}
    width = max(len(label) for _, label in ROWS)
    lines.append(f"{'comparison':<{width}}  value")
    for key, label in ROWS:
        lines.append(f"{label:<{width}}  {_cell(report.get(key))}")
    last = rollout.get("last_window")
    if last:
        lines += ["", "last window: " + ", ".join(f"{k} {_cell(v)}" for k, v in last.items())]
    history = rollout.get("history") or []
    if history:
        lines += ["", "moves:"]
        for move in history[-10:]:
            lines.append(f"  {move['action']:<8} {move['from']} -> {move['to']} ({move['reason']})")
    return "\n".join(lines)
