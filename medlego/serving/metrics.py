"""Prometheus metrics: the runtime's :class:`Counters` plus pool and registry state, read at scrape time.

The runtime counts without knowing Prometheus (``engine.counters``); the serving layer records
its own events (requests, decode time, end-to-end latency) into the same counters, and a
collector here turns one snapshot into metric families. Each server owns its own
``CollectorRegistry``, so several servers (tests) can run in one process.

Exported (all prefixed ``medlego_``):
    requests_total{adapter,task,outcome,api}      every diagnosis request and how it ended
    stage_seconds{stage}                          decode (incl. preprocessing), queue, prepare, inference
    request_seconds{api}                          end to end inside the server
    batch_size                                    images per engine batch
    inferences_total{adapter,task}                images diagnosed
    pool_hits_total / pool_misses_total / pool_loads_total / pool_evictions_total {tier}
        tiers: device (slot), host (copy in memory), node (local disk: folder store or node cache),
        store (downloaded from S3: a node miss)
    pool_load_seconds{tier}, pool_loaded_bytes_total{tier}   time and bytes to fill each tier on a miss
    pool_hit_ratio{tier}, pool_resident_adapters{tier}, pool_resident_bytes{tier}, pool_device_slots
    registry_adapters                             registered adapter versions
    queue_depth, inflight_requests, ready
    connections_refused_total{reason}             HTTP connections the guard closed (see serving/http_guard.py)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "medlego_"

HELP = {
    "requests": "Diagnosis requests by adapter, task, outcome and API",
    "inferences": "Images diagnosed by the engine, by adapter and task",
    "pool_hits": "Adapter lookups served by a pool tier",
    "pool_misses": "Adapter lookups that missed a pool tier",
    "pool_loads": "Adapters loaded into the next tier up, by the tier they came from",
    "pool_evictions": "Adapters evicted from a pool tier",
    "rejected": "Requests refused before queueing, by reason",
    "admin_operations": "Admin API operations by kind and outcome",
    "stage_seconds": "Latency per stage (decode includes preprocessing)",
    "request_seconds": "End-to-end request latency inside the server",
    "batch_size": "Images per engine batch",
    "load_seconds": "Time to load an adapter from disk into host memory",
    "pool_load_seconds": "Time to bring an adapter into a tier on a miss: store/node = read (download or local "
                         "disk), host = parse and pack, device = copy into a slot",
    "pool_loaded_bytes": "Bytes brought into each tier on misses",
    "queue_depth": "Requests waiting in the batcher",
    "inflight_requests": "Diagnosis requests admitted and not yet answered",
    "connections_refused": "HTTP connections closed by the server's guard, by reason (cap, evicted_idle, "
                           "header_timeout, body_timeout)",
    "multiplex_requests": "Ray mode: requests by whether the replica already held their adapter",
}


class CountersCollector:
    """Reads a service's counters, pool and registry when Prometheus scrapes."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []  # dynamic families: skip registration-time collection

    def collect(self):
        engine = self.service.engine
        snap = engine.counters.snapshot()
        yield from _families(CounterMetricFamily, snap["counters"])
        yield from _families(GaugeMetricFamily, snap["gauges"])
        yield from _histogram_families(snap["observations"])
        yield from _pool_families(engine, snap["counters"])
        g = GaugeMetricFamily(PREFIX + "registry_adapters", "Registered adapter versions")
        try:
            g.add_metric([], float(len(engine.registry)))
        except Exception:  # a scrape must not fail because the registry is briefly locked
            g.add_metric([], float("nan"))
        yield g
        g = GaugeMetricFamily(PREFIX + "inflight_requests", HELP["inflight_requests"])
        g.add_metric([], float(self.service.inflight))
        yield g
        g = GaugeMetricFamily(PREFIX + "ready", "1 once the base is loaded and warmed up")
        g.add_metric([], 1.0 if engine.ready else 0.0)
        yield g


class CountersOnlyCollector:
    """The generic families of a bare Counters object (the Ray ingress has no engine)."""

    def __init__(self, counters):
        self.counters = counters

    def describe(self):
        return []

    def collect(self):
        snap = self.counters.snapshot()
        yield from _families(CounterMetricFamily, snap["counters"])
        yield from _families(GaugeMetricFamily, snap["gauges"])
        yield from _histogram_families(snap["observations"])


def _grouped(items: dict) -> dict[str, list[tuple[dict, Any]]]:
    out: dict[str, list] = defaultdict(list)
    for (name, labels), value in items.items():
        out[name].append((dict(labels), value))
    return out


def _label_names(rows) -> list[str]:
    return sorted({k for labels, _ in rows for k in labels})


def _families(family_cls, values: dict):
    """One counter or gauge family per name, with every label set seen for it."""
    for name, rows in _grouped(values).items():
        keys = _label_names(rows)
        fam = family_cls(PREFIX + name, HELP.get(name, name), labels=keys)
        for labels, value in rows:
            fam.add_metric([str(labels.get(k, "")) for k in keys], float(value))
        yield fam


def _histogram_families(observations: dict):
    for name, rows in _grouped(observations).items():
        keys = _label_names(rows)
        fam = HistogramMetricFamily(PREFIX + name, HELP.get(name, name), labels=keys)
        for labels, (count, total, cumulative, bounds) in rows:
            # Counters.observe counts a value in every bucket whose bound is >= it: already cumulative
            buckets = [(_bound(b), float(c)) for b, c in zip(bounds, cumulative)] + [("+Inf", float(count))]
            fam.add_metric([str(labels.get(k, "")) for k in keys], buckets, float(total))
        yield fam


def _bound(b) -> str:
    return str(float(b))


def _pool_families(engine, counters: dict):
    stats = engine.pool_stats()
    resident = GaugeMetricFamily(PREFIX + "pool_resident_adapters", "Adapters resident in a pool tier", labels=["tier"])
    resident.add_metric(["device"], stats["device_resident"])
    resident.add_metric(["host"], stats["host_resident"])
    yield resident
    nbytes = GaugeMetricFamily(PREFIX + "pool_resident_bytes", "Bytes held by a pool tier (device: preallocated slots)",
                               labels=["tier"])
    nbytes.add_metric(["device"], stats["device_bytes"])
    nbytes.add_metric(["host"], stats["host_bytes"])
    yield nbytes
    slots = GaugeMetricFamily(PREFIX + "pool_device_slots", "Device slots in the adapter pool")
    slots.add_metric([], stats["device_slots"])
    yield slots
    pinned = GaugeMetricFamily(PREFIX + "pool_pinned_adapters", "Adapters pinned in the pool")
    pinned.add_metric([], stats["pinned"])
    yield pinned
    hits, misses = defaultdict(float), defaultdict(float)
    for (name, labels), value in counters.items():
        tier = dict(labels).get("tier")
        if name == "pool_hits":
            hits[tier] += value
        elif name == "pool_misses":
            misses[tier] += value
    ratio = GaugeMetricFamily(PREFIX + "pool_hit_ratio", "Hits / (hits + misses) per pool tier since start",
                              labels=["tier"])
    for tier in sorted(set(hits) | set(misses)):
        total = hits[tier] + misses[tier]
        ratio.add_metric([tier], hits[tier] / total if total else 0.0)
    yield ratio


def metrics_registry(service) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CountersCollector(service))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
