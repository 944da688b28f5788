"""The decode pool: worker threads that take tasks round-robin over clients.

A plain thread pool serves in arrival order, so a client that sends a burst of costly images (each
refused only after its header walk) puts the whole burst in front of everyone who comes after it.
Here each client has its own queue and the workers take the next task from the next client in
turn: a burst waits behind itself, and another client's image waits for at most the tasks already
running plus one per other waiting client. The client is the authenticated caller, else the peer
address (``serving.middleware`` and ``serving.auth`` note both on the request), read when the task
is submitted: that is on the event loop, in the request's own context.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from medlego.runtime.registry.audit import CURRENT


def client_of_request() -> str:
    """The fairness key of the request being served: its caller's name, else its peer address."""
    current = CURRENT.get() or {}
    return current.get("caller") or current.get("client") or ""


class FairPool(Executor):
    def __init__(self, workers: int, name: str, initializer: Callable[[], None] | None = None,
                 key: Callable[[], str] = client_of_request):
        self._key = key
        self._queues: dict[str, deque] = {}  # a client's waiting tasks
        self._turns: deque[str] = deque()  # clients with waiting tasks, in the order they are served
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(initializer,), name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        client = self._key()
        with self._ready:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            queue = self._queues.get(client)
            if queue is None:
                queue = self._queues[client] = deque()
                self._turns.append(client)
            queue.append((future, fn, args, kwargs))
            self._ready.notify()
        return future

    def _next(self):
        """The next client's oldest task (None once shut down and drained); the client goes to the back."""
        with self._ready:
            while not self._turns:
                if self._closed:
                    return None
                self._ready.wait()
            client = self._turns.popleft()
            queue = self._queues[client]
            task = queue.popleft()
            if queue:
                self._turns.append(client)
            else:
                del self._queues[client]
            return task

    def _work(self, initializer: Callable[[], None] | None) -> None:
        if initializer is not None:
            initializer()
        while (task := self._next()) is not None:
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._closed = True
            if cancel_futures:
                for queue in self._queues.values():
                    for future, *_ in queue:
                        future.cancel()
                self._queues.clear()
                self._turns.clear()
            self._ready.notify_all()
        if wait:
            for t in self._threads:
                t.join()
