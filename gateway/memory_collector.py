"""Scrape-time memory metrics: backend snapshots by component, budgets, reservations per
tenant, backend queues and adapter caches, process RSS/PSS/swap/faults, GPU memory.

Also each upstream's state: whether it is in rotation (the circuit: `available()`), its
retries and failures; and the standard `process_*` and `python_*` collectors of
prometheus_client, which the app registers on its own registry in a single process.

Single process: a custom prometheus_client collector reads everything at scrape time.
Multi-worker: each worker publishes the same samples into multiprocess gauges (summed over
live workers; GPU readings take the max, since every worker sees the same device; an
upstream is in rotation when every worker has it so: the min) and counters (as deltas), on
every scrape it serves and once a second in the background. The standard `process_*` and
`python_*` samples, which no aggregation makes true (CPU seconds, open fds, start time of
which process?), are published per worker: prometheus_client adds a `pid` label.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.core.backend import Backend, MemorySnapshot
from gateway.core.context import RequestContext
from gateway.core.procmem import GpuProbe, read_process_memory
from gateway.metrics import standard_collectors

Labels = tuple[tuple[str, str], ...]
# How multiprocess mode aggregates a gauge over workers (prometheus_client's modes)
Mode = Literal["livesum", "livemax", "livemin", "liveall"]


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    doc: str
    labels: Labels
    value: float
    counter: bool = False
    mode: Mode = "livesum"  # over workers; GPU: livemax (one device seen by every worker)
    # every worker reads the same value (a backend they all send to, the shared state): in
    # multiprocess mode one worker exports it, not each (their sum would count it N times)
    shared: bool = False


def snapshot_components(snap: MemorySnapshot) -> dict[str, int]:
    """Bytes by component of a MemorySnapshot, including `other` when something is measured.
    Reads the dataclass fields, so a component a backend adds (e.g. `runtime`) shows up."""
    out: dict[str, int] = {}
    for f in dataclasses.fields(snap):
        value = getattr(snap, f.name)
        if f.name == "measured":
            continue
        if isinstance(value, dict):
            out[f.name] = int(sum(value.values()))
        elif isinstance(value, int) and not isinstance(value, bool):
            out[f.name] = value
    if snap.other is not None:
        out["other"] = int(snap.other)
    return out


class MemoryCollector:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        tenants: Sequence[str],
        in_flight: Callable[[], Iterable[RequestContext]],
        gpu: GpuProbe,
    ) -> None:
        self.backends = backends
        self.tenants = tuple(tenants)
        self.in_flight = in_flight
        self.gpu = gpu
        # tenant -> bytes admission reserved; None: sum the requests in flight
        self.reservations: Callable[[], Mapping[str, int]] | None = None
        # shared_state's stats (policies/redis_quotas.py), when configured
        self.shared_state: Callable[[], Mapping[str, Any]] | None = None

    # ---- the samples (shared by both modes) ---------------------------------------------

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        for name, backend in self.backends.items():
            out.extend(self._backend(name, backend))
        out.extend(self._tenants())
        out.extend(self._process())
        if self.shared_state is not None:
            out.extend(self._shared_state(self.shared_state()))
        for dev in self.gpu.read():
            lab = (("device", dev.device),)
            out.append(Sample("gateway_gpu_memory_used_bytes", "GPU memory used (NVML).", lab,
                              dev.used, mode="livemax"))
            out.append(Sample("gateway_gpu_memory_total_bytes", "GPU memory total (NVML).", lab,
                              dev.total, mode="livemax"))
        return out

    def _backend(self, name: str, backend: Backend) -> Iterator[Sample]:
        b = (("backend", name),)
        snap = backend.memory()
        cap = backend.capacity()
        # a backend every worker sends to (vLLM): each reads the same server, export it once
        shared = cap is not None and cap.shared
        for component, value in snapshot_components(snap).items():
            yield Sample("gateway_memory_bytes", "Backend memory by component.",
                         (*b, ("component", component)), value, shared=shared)
        if snap.measured is not None:
            yield Sample("gateway_memory_measured_bytes",
                         "Memory the OS or GPU measures for the backend.", b, snap.measured,
                         shared=shared)
        for adapter, nbytes in snap.adapters.items():
            yield Sample("gateway_adapter_resident_bytes", "Bytes of each resident adapter.",
                         (*b, ("adapter", adapter)), nbytes, shared=shared)
        if cap is not None:
            yield Sample("gateway_memory_budget_bytes", "Configured memory budgets.",
                         (*b, ("pool", "kv")), cap.kv_bytes_total, shared=shared)
            yield Sample("gateway_memory_budget_bytes", "Configured memory budgets.",
                         (*b, ("pool", "adapters")), cap.adapter_budget_bytes, shared=shared)
            if cap.swap_bytes_total:
                yield Sample("gateway_memory_budget_bytes", "Configured memory budgets.",
                             (*b, ("pool", "kv_swap")), cap.swap_bytes_total, shared=shared)
            yield Sample("gateway_kv_reserved_bytes", "KV cache bytes reserved by requests.", b,
                         cap.kv_bytes_total - cap.kv_bytes_free, shared=shared)
        st = backend.stats()
        gauges: dict[str, tuple[int | None, str]] = {
            "gateway_queue_depth": (st.waiting, "Requests waiting inside the backend."),
            "gateway_batch_running": (st.running, "Requests in the backend's batch."),
            "gateway_kv_swapped_bytes": (st.kv_swapped_bytes,
                                         "Host bytes holding preempted sequences' KV (swap)."),
        }
        for metric, (level, doc) in gauges.items():
            if level is not None:
                yield Sample(metric, doc, b, level, shared=shared)
        counters: dict[str, tuple[int | None, str]] = {
            "gateway_adapter_loads": (st.adapter_loads, "Adapters loaded from storage."),
            "gateway_adapter_hits": (st.adapter_hits, "Requests whose adapter was resident."),
            "gateway_adapter_evictions": (st.adapter_evictions, "Adapters evicted."),
            "gateway_kv_preemptions": (st.kv_preemptions,
                                       "Sequences preempted when the KV cache ran short."),
            "gateway_kv_swap_outs": (st.kv_swap_outs, "Preemptions whose KV went to host swap."),
            "gateway_kv_recomputes": (st.kv_recomputes,
                                      "Preemptions whose KV was dropped and recomputed."),
            "gateway_kv_resumes": (st.kv_resumes, "Preempted sequences that resumed."),
            "gateway_prefix_cache_query_tokens": (
                st.prefix_query_tokens, "Prompt tokens of sequences that may share cached KV."),
            "gateway_prefix_cache_hit_tokens": (
                st.prefix_hit_tokens, "Prompt tokens served from cached KV blocks."),
        }
        for metric, (count, doc) in counters.items():
            if count is not None:
                yield Sample(metric, doc, b, count, counter=True)
        yield from self._upstream(b, backend, st.upstream_retries, st.upstream_failures)

    def _upstream(self, b: Labels, backend: Backend, retries: int | None,
                  failures: int | None) -> Iterator[Sample]:
        yield Sample("gateway_backend_available",
                     "1 while the backend is in rotation (0: out after failures, until re-probed).",
                     b, 1 if backend.available() else 0, mode="livemin")
        if retries is not None:
            yield Sample("gateway_upstream_retries", "Retries of calls to an upstream.", b,
                         retries, counter=True)
        if failures is not None:
            yield Sample("gateway_upstream_failures",
                         "Upstream failures: connect errors, timeouts, 5xx.", b, failures,
                         counter=True)

    def _tenants(self) -> Iterator[Sample]:
        reserved = dict.fromkeys(self.tenants, 0)
        count = dict.fromkeys(self.tenants, 0)
        admitted = self.reservations() if self.reservations is not None else None
        for ctx in self.in_flight():
            if ctx.tenant in reserved:
                if admitted is None:
                    reserved[ctx.tenant] += ctx.memory.kv_bytes_reserved + ctx.memory.adapter_bytes
                count[ctx.tenant] += 1
        for tenant, nbytes in (admitted or {}).items():
            if tenant in reserved:
                reserved[tenant] = nbytes
        for tenant in self.tenants:
            lab = (("tenant", tenant),)
            yield Sample("gateway_memory_reserved_bytes",
                         "Bytes reserved for the tenant's requests (admission's reservations, else in-flight KV + adapters).", lab,
                         reserved[tenant])
            yield Sample("gateway_requests_in_flight", "Requests in flight.", lab, count[tenant])

    def _process(self) -> Iterator[Sample]:
        pm = read_process_memory()
        values = {"gateway_process_resident_memory_bytes": (pm.rss, "Resident set size."),
                  "gateway_process_pss_bytes": (pm.pss, "Proportional set size (smaps_rollup)."),
                  "gateway_process_swap_bytes": (pm.swap, "Swapped-out bytes.")}
        for metric, (value, doc) in values.items():
            if value is not None:
                yield Sample(metric, doc + " Summed over workers.", (), value)
        if pm.major_faults is not None:
            yield Sample("gateway_process_major_page_faults", "Major page faults.", (),
                         pm.major_faults, counter=True)

    def _shared_state(self, st: Mapping[str, Any]) -> Iterator[Sample]:
        yield Sample("gateway_shared_state_up", "1 while Redis answers.",
                     (), 1 if st.get("up") else 0, shared=True)
        yield Sample("gateway_shared_state_processes",
                     "Live gateway processes sharing the state (heartbeats; last known).", (),
                     st.get("processes", 1), shared=True)
        for fallback_mode, n in dict(st.get("fallbacks", {})).items():
            yield Sample("gateway_shared_state_fallbacks",
                         "Admission decisions taken without Redis, by on_unavailable mode.",
                         (("mode", fallback_mode),), n, counter=True)
        yield Sample("gateway_shared_state_errors", "Redis round trips that failed.", (),
                     st.get("errors", 0), counter=True)

    # ---- single process: a custom collector ---------------------------------------------

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for s in self.samples():
            fam = families.get(s.name)
            if fam is None:
                keys = [k for k, _ in s.labels]
                fam = (CounterMetricFamily(s.name, s.doc, labels=keys) if s.counter
                       else GaugeMetricFamily(s.name, s.doc, labels=keys))
                families[s.name] = fam
            fam.add_metric([v for _, v in s.labels], s.value)  # type: ignore[attr-defined]
        yield from families.values()

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the set of families depends on what backends report


class MultiprocessPublisher:
    """Multi-worker mode: writes a collector's samples into this worker's multiprocess files.

    Shared samples (the same reading in every worker) are written by one worker only: the
    one holding an exclusive lock on a file in the multiprocess directory. The kernel drops
    the lock when that worker exits, and another takes it at its next publish."""

    def __init__(self, collector: MemoryCollector, directory: str | None = None) -> None:
        self.collector = collector
        self._lock_path = os.path.join(directory, "shared-samples.lock") if directory else None
        self._lock: int | None = None
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._last: dict[tuple[str, Labels], float] = {}
        self.standard = standard_collectors(CollectorRegistry(auto_describe=True))

    def _exports_shared(self) -> bool:
        if self._lock is None and self._lock_path is not None:
            fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._lock = fd
        return self._lock is not None

    def publish(self) -> None:
        for s in self.collector.samples():
            keys = tuple(k for k, _ in s.labels)
            values = [v for _, v in s.labels]
            if s.counter:
                base = s.name
                counter = self._counters.get(base)
                if counter is None:
                    counter = self._counters[base] = Counter(base, s.doc, keys, registry=None)
                delta = s.value - self._last.get((s.name, s.labels), 0.0)
                self._last[(s.name, s.labels)] = s.value
                if delta > 0:
                    (counter.labels(*values) if keys else counter).inc(delta)
                continue
            if s.shared and not self._exports_shared():
                continue
            self._set(s.name, s.doc, keys, values, s.value, s.mode)
        for family in self.standard.collect():  # per worker (pid label), as gauges
            for sample in family.samples:
                keys = tuple(sample.labels)
                self._set(sample.name, family.documentation, keys,
                          [sample.labels[k] for k in keys], sample.value, "liveall")

    def _set(self, name: str, doc: str, keys: tuple[str, ...], values: list[str], value: float,
             mode: Mode) -> None:
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = self._gauges[name] = Gauge(name, doc, keys, registry=None,
                                               multiprocess_mode=mode)
        (gauge.labels(*values) if keys else gauge).set(value)
