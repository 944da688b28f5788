"""Dynamic batching: many callers, one engine, batches by size or time, bounded queue.

Requests are resolved and validated by the caller (``engine.request``: this is where a cold
adapter is loaded into host memory, off the batch path), then queued. One worker thread takes up
to ``max_batch`` requests, waiting at most ``max_wait_ms`` after the first (or after the engine
became free, if later; ``max_wait_ms`` more while requests are still being decoded or resolved), and runs
them through the engine as one mixed-adapter batch. Each caller waits on its own future; a
cancelled caller is dropped before the batch runs and never breaks it; a request that fails
alone fails alone.
A full queue refuses at once with :class:`OverloadedError` instead of growing memory.

Usable from asyncio (``await submit(...)``) and from threads (``submit_future``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .engine import Diagnosis, Engine, Request
from .errors import OverloadedError


@dataclass
class _Item:
    request: Request
    future: cf.Future
    enqueued: float


class DynamicBatcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 preparing: Callable[[], int] = lambda: 0):
        """``preparing``: how many requests are admitted but not queued yet (their images being decoded)."""
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.preparing = preparing
        self.counters = engine.counters
        self._queue: deque[_Item] = deque()
        self._free_since = 0.0  # when the engine last finished a batch (perf_counter; the worker's own)
        self._resolving = 0  # callers of submit/submit_future inside engine.request: about to queue
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="medlego-batcher", daemon=True)
        self._thread.start()

    # -- submission ---------------------------------------------------------------------------
    def submit_request(self, request: Request) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._cv:
            if self._stopped:
                raise OverloadedError("the batcher is shutting down")
            if len(self._queue) >= self.max_queue:
                self.counters.inc("rejected", reason="overloaded")
                raise OverloadedError(f"server overloaded: {len(self._queue)} requests queued (limit {self.max_queue}); retry later")
            self._queue.append(_Item(request, fut, time.perf_counter()))
            self.counters.set("queue_depth", len(self._queue))
            self._cv.notify()
        return fut

    def submit_future(self, image: torch.Tensor, adapter_ref: str | None, task: str | None = None,
                      top_k: int | None = None) -> cf.Future:
        """Resolve + validate in the caller's thread (raises its own error), then queue."""
        return self.submit_request(self._prepared(image, adapter_ref, task, top_k))

    async def submit(self, image, adapter_ref, task=None, top_k=None) -> Diagnosis:
        loop = asyncio.get_running_loop()
        # resolve may read an adapter from disk: keep it off the event loop
        request = await loop.run_in_executor(None, self._prepared, image, adapter_ref, task, top_k)
        return await asyncio.wrap_future(self.submit_request(request))

    def _prepared(self, image, adapter_ref, task, top_k) -> Request:
        """engine.request, counted as about to queue while it runs: a closed-loop client answered by the last
        batch resolves (and may load) its next adapter before it queues again, and a batch waits for it as
        it waits for an image being decoded (at most max_wait more)."""
        with self._cv:
            self._resolving += 1
        try:
            return self.engine.request(image, adapter_ref, task, top_k)
        finally:
            with self._cv:
                self._resolving -= 1  # before it is queued: a batch never waits for what is there

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- worker -------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item]:
        with self._cv:
            while not self._queue and not self._stopped:
                self._cv.wait()
            if self._stopped and not self._queue:
                return []
            # the wait for company counts from when the engine could take the batch: requests queued during
            # a batch would otherwise start at once, without the clients that batch just answered, and
            # closed-loop clients then settle into half-size batches taking turns (at 4 in flight: two
            # batches of 2 alternating, each request waiting out the other batch as well as its own)
            deadline = max(self._queue[0].enqueued, self._free_since) + self.max_wait
            while len(self._queue) < self.max_batch and not self._stopped:
                # requests still being decoded or resolved are nearly here (clients just answered, sending
                # again): worth max_wait more
                nearly_here = self._resolving or self.preparing()
                remaining = deadline + (self.max_wait if nearly_here else 0.0) - time.perf_counter()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self.counters.set("queue_depth", len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]  # drop cancelled callers
            if not live:
                continue
            start = time.perf_counter()
            for it in live:
                self.counters.observe("stage_seconds", start - it.enqueued, stage="queue")
            try:
                results = self.engine.run([it.request for it in live])
            except BaseException as e:  # an engine bug must not kill the worker or strand callers
                results = [e] * len(live)
            self._free_since = time.perf_counter()
            for it, res in zip(live, results):
                if isinstance(res, BaseException):
                    it.future.set_exception(res)
                else:
                    res.timings["queue"] = start - it.enqueued
                    it.future.set_result(res)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:  # anything left gets a clear answer, not a hang
            while self._queue:
                it = self._queue.popleft()
                if it.future.set_running_or_notify_cancel():
                    it.future.set_exception(OverloadedError("the batcher stopped before this request ran"))
