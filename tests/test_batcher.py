"""Dynamic batcher: concurrent callers share batches; a full queue refuses; failures stay local."""

import asyncio
import threading

import pytest
import torch

from medlego.runtime.batcher import DynamicBatcher
from medlego.runtime.config import EngineConfig
from medlego.runtime.engine import Engine
from medlego.runtime.errors import AdapterNotFoundError, OverloadedError
from medlego.runtime.registry import Registry
from waiting import wait_until


@pytest.fixture
def engine(tmp_path, tiny_base, make_adapter):
    reg = Registry(tmp_path / "data")
    for i in range(3):
        reg.register(f"a{i}", make_adapter(seed=i, rank=2 + i).to_bytes())
    return Engine(tiny_base, reg, EngineConfig(slots=4))


def test_concurrent_callers_are_batched_and_correct(engine):
    batcher = DynamicBatcher(engine, max_batch=16, max_wait_ms=200, max_queue=64)
    try:
        torch.manual_seed(0)
        images = torch.randn(12, 3, 32, 32)
        refs = [f"a{i % 3}" for i in range(12)]

        async def main():
            return await asyncio.gather(*[batcher.submit(images[i], refs[i]) for i in range(12)])

        results = asyncio.run(main())
        direct = engine.infer(images, refs)
        for r, d in zip(results, direct):
            assert r.probabilities == pytest.approx(d.probabilities, abs=1e-5)
            assert "queue" in r.timings
        snap = engine.counters.snapshot()["observations"]
        sizes = [v for k, v in snap.items() if k[0] == "batch_size"][0]
        count, total = sizes[0], sizes[1]
        # the 12 batcher requests ran in fewer than 12 batches (plus the direct call's one batch)
        assert count - 1 < 12 and total - 12 == 12
    finally:
        batcher.stop()


def test_full_queue_refuses(engine):
    gate = threading.Event()
    original = engine.run

    def slow_run(reqs):
        gate.wait(10)
        return original(reqs)

    engine.run = slow_run  # hold the worker so the queue fills up (the queue itself is real)
    batcher = DynamicBatcher(engine, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        x = torch.randn(3, 32, 32)
        futs = [batcher.submit_future(x, "a0")]
        wait_until(lambda: batcher.queue_depth == 0, what="the worker taking the first request")
        futs += [batcher.submit_future(x, "a0"), batcher.submit_future(x, "a1")]
        with pytest.raises(OverloadedError, match="overloaded"):
            batcher.submit_future(x, "a2")
        gate.set()
        assert all(f.result(30).probabilities for f in futs)
    finally:
        gate.set()
        batcher.stop()


def test_cancelled_and_failing_callers_do_not_break_the_batch(engine):
    batcher = DynamicBatcher(engine, max_batch=8, max_wait_ms=300, max_queue=16)
    try:
        x = torch.randn(3, 32, 32)
        with pytest.raises(AdapterNotFoundError):
            batcher.submit_future(x, "missing")  # refused before queueing
        a = batcher.submit_future(x, "a0")
        b = batcher.submit_future(x, "a1")
        c = batcher.submit_future(x, "a2")
        assert b.cancel()
        assert a.result(30).adapter == "a0" and c.result(30).adapter == "a2"
        assert b.cancelled()
    finally:
        batcher.stop()


def _recording(engine, gate: threading.Event | None = None):
    """Wrap engine.run to record each batch's size (and hold the first batch until `gate`)."""
    sizes: list[int] = []
    original = engine.run

    def run(reqs):
        sizes.append(len(reqs))
        if gate is not None and len(sizes) == 1:
            gate.wait(10)
        return original(reqs)

    engine.run = run
    return sizes


def test_the_wait_for_company_counts_from_when_the_engine_became_free(engine):
    """A request queued during a batch waits for the clients that batch answers: closed-loop clients
    must not settle into half-size batches that take turns."""
    gate = threading.Event()
    sizes = _recording(engine, gate)
    batcher = DynamicBatcher(engine, max_batch=8, max_wait_ms=500, max_queue=16)
    try:
        x = torch.randn(3, 32, 32)
        first = batcher.submit_future(x, "a0")
        wait_until(lambda: len(sizes) >= 1, what="the first batch running (held by the gate)")
        queued_during = batcher.submit_future(x, "a1")
        threading.Event().wait(0.8)  # longer than max_wait since it was queued
        gate.set()
        first.result(30)
        answered_client_again = batcher.submit_future(x, "a2")  # the answered client sends at once
        queued_during.result(30), answered_client_again.result(30)
        assert sizes == [1, 2]
    finally:
        gate.set()
        batcher.stop()


def test_requests_still_being_decoded_are_waited_for(engine):
    preparing = [1]
    sizes = _recording(engine)
    batcher = DynamicBatcher(engine, max_batch=8, max_wait_ms=400, max_queue=16, preparing=lambda: preparing[0])
    try:
        x = torch.randn(3, 32, 32)
        first = batcher.submit_future(x, "a0")
        threading.Event().wait(0.55)  # past max_wait, within max_wait more for the one being decoded
        preparing[0] = 0
        second = batcher.submit_future(x, "a1")
        first.result(30), second.result(30)
        assert sizes == [2]
    finally:
        batcher.stop()


def test_a_caller_still_resolving_its_adapter_is_waited_for(engine):
    """A thread caller inside engine.request (resolving, perhaps loading its adapter) is about to queue: the
    batch waits max_wait more for it, as for an image being decoded; with nobody resolving it would not."""
    sizes = _recording(engine)
    gate = threading.Event()
    resolving = threading.Event()
    original = engine.resolve

    def slow_resolve(ref, **kw):
        if ref == "a1":
            resolving.set()
            gate.wait(10)  # a registry or node-cache read that takes a while
        return original(ref, **kw)

    engine.resolve = slow_resolve
    batcher = DynamicBatcher(engine, max_batch=8, max_wait_ms=400, max_queue=16)
    try:
        x = torch.randn(3, 32, 32)
        late = []
        caller = threading.Thread(target=lambda: late.append(batcher.submit_future(x, "a1")))
        caller.start()
        resolving.wait(10)
        first = batcher.submit_future(x, "a0")
        threading.Event().wait(0.55)  # past max_wait, within max_wait more for the one resolving
        gate.set()
        caller.join(10)
        first.result(30), late[0].result(30)
        assert sizes == [2]
        alone = batcher.submit_future(x, "a2")  # nobody resolving: max_wait, then the batch runs alone
        alone.result(30)
        assert sizes == [2, 1]
    finally:
        gate.set()
        batcher.stop()
