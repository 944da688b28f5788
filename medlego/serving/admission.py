"""Admission: a bound on the diagnosis requests in flight; beyond it, 503 at once.

Everything admitted is being decoded, queued in the batcher or running, so the bound
(``max_queue + 2 × max_batch``) caps the memory and the waiting a burst can cause.
"""

from __future__ import annotations

import threading

from medlego.runtime.counters import Counters
from medlego.runtime.errors import OverloadedError


class Admission:
    def __init__(self, limit: int, counters: Counters):
        self.limit = limit
        self.counters = counters
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return self._inflight

    def admit(self, n: int) -> None:
        """Take `n` places, or raise OverloadedError (counted as rejected) without taking any."""
        with self._lock:
            if self._inflight + n > self.limit:
                self.counters.inc("rejected", reason="overloaded")
                raise OverloadedError(f"server overloaded: {self._inflight} requests in flight (limit "
                                      f"{self.limit}); retry later")
            self._inflight += n

    def release(self, n: int) -> None:
        with self._lock:
            self._inflight -= n
