"""What keeps the Ray fleet whole: a replica's health is a batch its engine really ran, and a diagnosis
whose replica died is sent once more, to another replica.

Health: Ray Serve calls ``MedlegoReplica.check_health`` every ``health_check_period_s`` and replaces
a replica whose check fails. "Warmed up" is not enough: a device that faulted (a CUDA error, a lost
GPU) leaves the process alive and every batch failing. :class:`EngineProbe` queues one cached
image with no adapter (the base's features alone: no slot, no registry read) through the replica's
own batcher, so the check proves the batcher thread, the engine and the device, and joins a real
batch when there is one (under load it costs one image more in a batch, idle a batch of one).

Faults for tests: with ``MEDLEGO_TEST_FAULTS=1`` in the replicas' environment (and only then),
``MedlegoReplica.inject_fault("device")`` makes that replica's engine raise on every batch, as a
faulted device would (the health check must then fail and Ray must replace the replica), and
``inject_fault("slow")`` makes each batch take a second more (so a replica killed then surely has
requests in flight). Off by default, so a production replica cannot be broken through its handle.

Retry: a replica killed with a request in flight answers the caller with ``ActorDiedError``. Ray's
router marks that replica dead and routes new requests elsewhere, but does not resend the request
in flight. A diagnosis has no side effect but its audit row, so the ingress sends it once more (Ray
then picks a live replica); should that fail too, the client gets 503 with Retry-After, never a
hang or a 500.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from medlego.runtime.counters import Counters
from medlego.runtime.errors import OverloadedError

FAULTS_ENV = "MEDLEGO_TEST_FAULTS"
T = TypeVar("T")


class EngineProbe:
    """One base-only image through the batcher: the proof that this replica can still run a batch."""

    def __init__(self, service, timeout_s: float = 20.0):
        s = service.engine.base.input_size
        # built once (validated by the engine like any request), queued again at every check
        self.request = service.engine.request(torch.zeros(3, s, s), None)
        self.service = service
        self.timeout_s = timeout_s  # below Ray's health_check_timeout_s (30 s): our message, not Ray's
        self.checks = 0

    async def check(self) -> None:
        """Raise (the replica is unhealthy) unless the probe's batch ran and gave finite features, or, when
        the replica is too busy for the probe to run in time (queue full, or queued behind the load),
        real batches completed meanwhile: a busy engine must not be mistaken for a broken one."""
        done = self._batches()
        try:
            future = self.service.batcher.submit_request(self.request)
        except OverloadedError:  # the queue is full: the engine's progress has to tell instead
            await self._progress_since(done)
            return
        try:
            d = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            if self._batches() > done:
                return  # queued behind the load, which is being served
            raise RuntimeError(f"engine probe: no batch ran within {self.timeout_s:.0f} s") from None
        except Exception as e:
            raise RuntimeError(f"engine probe failed: {type(e).__name__}: {e}") from e
        if not d.embedding or not torch.isfinite(torch.tensor(d.embedding)).all():
            raise RuntimeError("engine probe: no features, or non-finite ones")
        self.checks += 1

    def _batches(self) -> int:
        """Batches the engine completed (it counts one only after the forward pass returned)."""
        return self.service.engine.counters.observations("batch_size")[0]

    async def _progress_since(self, done: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self._batches() <= done:
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine probe: queue full and no batch ran within {self.timeout_s:.0f} s")
            await asyncio.sleep(0.1)


def inject_fault(service, kind: str) -> None:
    """The test hook behind ``MedlegoReplica.inject_fault`` (see the module doc); refused unless enabled."""
    if os.environ.get(FAULTS_ENV) != "1":
        raise PermissionError(f"fault injection is off (set {FAULTS_ENV}=1 in the replicas' environment)")
    run = service.engine.run

    def faulted(requests):  # what a lost device does to every batch from now on
        raise RuntimeError("injected device fault (MEDLEGO_TEST_FAULTS)")

    def slow(requests):  # every batch takes a second more: requests are surely in flight here
        time.sleep(1.0)
        return run(requests)

    faults = {"device": faulted, "slow": slow}
    if kind not in faults:
        raise ValueError(f"unknown fault '{kind}' (known: {', '.join(faults)})")
    service.engine.run = faults[kind]


async def once_more(call: Callable[[], Awaitable[T]], counters: Counters) -> T:
    """`call()`; sent once more if its replica died or was unreachable; 503 if that fails too."""
    try:
        return await call()
    except RayActorError:  # ActorDiedError, ActorUnavailableError: the replica, not the request
        counters.inc("replica_retries")
    try:
        return await call()
    except RayActorError as e:
        what = "unreachable" if isinstance(e, ActorUnavailableError) else "gone"
        # 503 with Retry-After, as any other lack of capacity (runtime/errors.py holds every error class)
        raise OverloadedError(f"the replicas serving this request are {what}; retry") from None
