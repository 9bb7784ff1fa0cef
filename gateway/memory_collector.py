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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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

    # ---- the samples (shared by both modes) ---------------------------------------------

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        for name, backend in self.backends.items():
            out.extend(self._backend(name, backend))
        out.extend(self._tenants())
        out.extend(self._process())
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
        for component, value in snapshot_components(snap).items():
            yield Sample("gateway_memory_bytes", "Backend memory by component.",
                         (*b, ("component", component)), value)
        if snap.measured is not None:
            yield Sample("gateway_memory_measured_bytes",
                         "Memory the OS or GPU measures for the backend.", b, snap.measured)
        for adapter, nbytes in snap.adapters.items():
            yield Sample("gateway_adapter_resident_bytes", "Bytes of each resident adapter.",
                         (*b, ("adapter", adapter)), nbytes)
        cap = backend.capacity()
        if cap is not None:
            yield Sample("gateway_memory_budget_bytes", "Configured memory budgets.",
                         (*b, ("pool", "kv")), cap.kv_bytes_total)
            yield Sample("gateway_memory_budget_bytes", "Configured memory budgets.",
                         (*b, ("pool", "adapters")), cap.adapter_budget_bytes)
            yield Sample("gateway_kv_reserved_bytes", "KV cache bytes reserved by requests.", b,
                         cap.kv_bytes_total - cap.kv_bytes_free)
        st = backend.stats()
        gauges: dict[str, tuple[int | None, str]] = {
            "gateway_queue_depth": (st.waiting, "Requests waiting inside the backend."),
            "gateway_batch_running": (st.running, "Requests in the backend's batch."),
        }
        for metric, (level, doc) in gauges.items():
            if level is not None:
                yield Sample(metric, doc, b, level)
        counters: dict[str, tuple[int | None, str]] = {
            "gateway_adapter_loads": (st.adapter_loads, "Adapters loaded from storage."),
            "gateway_adapter_hits": (st.adapter_hits, "Requests whose adapter was resident."),
            "gateway_adapter_evictions": (st.adapter_evictions, "Adapters evicted."),
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
    """Multi-worker mode: writes a collector's samples into this worker's multiprocess files."""

    def __init__(self, collector: MemoryCollector) -> None:
        self.collector = collector
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._last: dict[tuple[str, Labels], float] = {}
        self.standard = standard_collectors(CollectorRegistry(auto_describe=True))

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
