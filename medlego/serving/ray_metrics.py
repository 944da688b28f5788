"""Engine counters mirrored into Ray's metrics (``ray_medlego_*``), by a thread of their own, so a
fleet's Prometheus scrapes every replica through Ray's metrics endpoint."""

from __future__ import annotations

import logging
import threading

from medlego.runtime.counters import Counters

log = logging.getLogger("medlego.serving")


class RayMetricsBridge:
    """Mirror a Counters object into Ray's metrics every few seconds (counters as deltas).

    Histograms are exported the way Prometheus stores them: ``<name>_bucket{le=...}``,
    ``<name>_count`` and ``<name>_sum`` counters.
    """

    def __init__(self, counters: Counters, extra_gauges=None, period_s: float = 5.0):
        self.counters = counters
        self.extra_gauges = extra_gauges or (lambda: {})
        self.period_s = period_s
        self._last: dict = {}
        self._metrics: dict = {}
        self._lock = threading.Lock()
        self.syncs = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medlego-ray-metrics", daemon=True)
        self._thread.start()

    def _metric(self, kind, name: str, keys: tuple[str, ...]):
        from ray.serve import metrics as ray_metrics

        key = (kind, name, keys)
        if key not in self._metrics:
            cls = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge}[kind]
            self._metrics[key] = cls(f"medlego_{name}", description=f"medlego {name}", tag_keys=keys)
        return self._metrics[key]

    def _add(self, name: str, labels: dict, value: float) -> None:
        k = (name, tuple(sorted(labels.items())))
        delta = value - self._last.get(k, 0.0)
        self._last[k] = value
        if delta > 0:
            self._metric("counter", name, tuple(sorted(labels))).inc(delta, tags={k2: str(v) for k2, v in labels.items()} or None)

    def sync(self) -> None:
        with self._lock:
            try:
                self._sync()
                self.syncs += 1
                self.last_error = None
            except Exception as e:  # metrics must never take a replica down
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("syncing Ray metrics failed: %s", self.last_error)

    def _sync(self) -> None:
        snap = self.counters.snapshot()
        for (name, labels), value in snap["counters"].items():
            self._add(f"{name}_total", dict(labels), value)
        for (name, labels), (count, total, cumulative, bounds) in snap["observations"].items():
            labels = dict(labels)
            self._add(f"{name}_count", labels, count)
            self._add(f"{name}_sum", labels, total)
            for b, c in zip(bounds, cumulative):
                self._add(f"{name}_bucket", {**labels, "le": str(float(b))}, c)
            self._add(f"{name}_bucket", {**labels, "le": "+Inf"}, count)
        gauges = {name: (dict(labels), v) for (name, labels), v in snap["gauges"].items()}
        for name, (labels, v) in list(gauges.items()) + [(n, ({}, v)) for n, v in self.extra_gauges().items()]:
            self._metric("gauge", name, tuple(sorted(labels))).set(float(v), tags={k: str(x) for k, x in labels.items()} or None)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sync()

    def stop(self) -> None:
        self._stop.set()
