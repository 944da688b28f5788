"""Thread-safe counters and observations that the serving layer exports (Prometheus, Ray metrics).

The runtime has no dependency on prometheus-client: it counts here, and a collector in
serving/ reads :meth:`Counters.snapshot` at scrape time.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# Bucket upper bounds for observations (seconds, or sizes for batch sizes).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple, float] = defaultdict(float)  # (name, labels) -> value
        self._gauges: dict[tuple, float] = {}
        self._obs: dict[tuple, list] = {}  # (name, labels) -> [count, sum, bucket counts...]

    @staticmethod
    def _key(name: str, labels: dict) -> tuple:
        return (name, tuple(sorted(labels.items())))

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counts[self._key(name, labels)] += value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._gauges[self._key(name, labels)] = value

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = SIZE_BUCKETS if name.endswith("size") else SECONDS_BUCKETS
        with self._lock:
            rec = self._obs.get(self._key(name, labels))
            if rec is None:
                rec = self._obs[self._key(name, labels)] = [0, 0.0, [0] * len(buckets), buckets]
            rec[0] += 1
            rec[1] += value
            for i, ub in enumerate(buckets):
                if value <= ub:
                    rec[2][i] += 1

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._counts.get(self._key(name, labels), self._gauges.get(self._key(name, labels), 0.0))

    def total(self, name: str) -> float:
        with self._lock:
            return sum(v for (n, _), v in self._counts.items() if n == name)

    def observations(self, name: str) -> tuple[int, float]:
        """(count, sum) over every label set of an observation."""
        with self._lock:
            recs = [r for (n, _), r in self._obs.items() if n == name]
            return sum(r[0] for r in recs), sum(r[1] for r in recs)

    def snapshot(self) -> dict:
        """{'counters': {(name, labels): v}, 'gauges': {...}, 'observations': {(name, labels): (count, sum, buckets, bounds)}}"""
        with self._lock:
            return {"counters": dict(self._counts), "gauges": dict(self._gauges),
                    "observations": {k: (r[0], r[1], list(r[2]), r[3]) for k, r in self._obs.items()}}
