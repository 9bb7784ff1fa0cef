"""The /debug/memory document: backend snapshots (components adding up to the measured total),
every request in flight with its memory, totals per tenant, the process and the GPUs."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from gateway.core.procmem import read_process_memory
from gateway.memory_collector import snapshot_components
from gateway.telemetry import Telemetry


def memory_report(telemetry: Telemetry) -> dict[str, Any]:
    backends: dict[str, Any] = {}
    for name, backend in telemetry.backends.items():
        snap = backend.memory()
        cap = backend.capacity()
        components = snapshot_components(snap)
        backends[name] = {
            # `memory` keeps the snapshot's own fields (adapters per name) plus `other`.
            "memory": {**dataclasses.asdict(snap), "other": snap.other},
            "components": components,
            "measured": snap.measured,
            "components_sum": sum(components.values()),
            "capacity": dataclasses.asdict(cap) if cap is not None else None,
            "stats": dataclasses.asdict(backend.stats()),
        }
    now = time.monotonic()
    requests = []
    tenants: dict[str, dict[str, int]] = {}
    for rec in telemetry.in_flight_records():
        ctx = rec.ctx
        if ctx is None:
            continue
        mem = dataclasses.asdict(ctx.memory)
        requests.append({
            "request_id": ctx.request_id,
            "tenant": ctx.tenant,
            "model": ctx.requested_model,
            "target_model": ctx.target_model,
            "backend": ctx.backend,
            "adapter": ctx.adapter,
            "age_seconds": round(now - rec.start, 6),
            "phase": "decode" if rec.first_chunk is not None else "prefill_or_queue",
            "memory": mem,
        })
        t = tenants.setdefault(ctx.tenant, {"requests": 0, "kv_bytes_reserved": 0,
                                            "kv_bytes_peak": 0, "adapter_bytes": 0})
        t["requests"] += 1
        t["kv_bytes_reserved"] += ctx.memory.kv_bytes_reserved
        t["kv_bytes_peak"] += ctx.memory.kv_bytes_peak
        t["adapter_bytes"] += ctx.memory.adapter_bytes
    gpus = [dataclasses.asdict(g) for g in telemetry.gpu.read()]
    return {
        "backends": backends,
        "requests": requests,
        "tenants": tenants,
        "process": dataclasses.asdict(read_process_memory()),
        "gpus": gpus if telemetry.gpu.available else None,
    }
