"""The decode pool takes turns between clients (issue 24: a burst of costly images delays its sender,
not everyone after it)."""

from __future__ import annotations

import contextvars
import threading

import pytest

from medlego.serving.fair_pool import FairPool, client_of_request
from medlego.runtime.registry.audit import CURRENT


def _pool_with_a_held_worker(key: list[str]):
    """One worker, held on a first task until released, so that the queue's order is what is tested."""
    pool = FairPool(1, "test-fair", key=lambda: key[0])
    release, started = threading.Event(), threading.Event()
    key[0] = "warm-up"
    first = pool.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return pool, release, first


def test_a_burst_waits_behind_itself_not_in_front_of_others():
    key = [""]
    pool, release, first = _pool_with_a_held_worker(key)
    order: list[str] = []
    key[0] = "attacker"
    burst = [pool.submit(order.append, f"attacker-{i}") for i in range(10)]
    key[0] = "clinic"
    clinic = pool.submit(order.append, "clinic")  # came after the whole burst
    release.set()
    for f in [first, *burst, clinic]:
        f.result(timeout=10)
    assert order.index("clinic") == 1, order  # one attacker task (its turn came first), then the clinic's
    assert order[2:] == [f"attacker-{i}" for i in range(1, 10)]  # the burst keeps its own order
    pool.shutdown()


def test_turns_rotate_over_every_waiting_client_and_errors_reach_the_caller():
    key = [""]
    pool, release, first = _pool_with_a_held_worker(key)
    order: list[str] = []
    futures = []
    for i in range(3):
        for client in ("a", "b", "c"):
            key[0] = client
            futures.append(pool.submit(order.append, f"{client}{i}"))
    key[0] = "b"
    failing = pool.submit(lambda: 1 / 0)
    release.set()
    for f in [first, *futures]:
        f.result(timeout=10)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    pool.shutdown()


def test_shutdown_cancels_waiting_tasks_and_refuses_new_ones():
    key = [""]
    pool, release, first = _pool_with_a_held_worker(key)
    waiting = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert waiting.cancelled() and first.result(timeout=10)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_the_key_is_the_caller_else_the_peer_address():
    def check():  # in a context of its own: other tests may leave a request's context on this thread
        assert client_of_request() == ""  # no request being served
        current: dict = {"id": "r1", "client": "10.0.0.7"}
        CURRENT.set(current)
        assert client_of_request() == "10.0.0.7"
        current["caller"] = "radiology-pacs"  # the token check notes the caller on the same dict
        assert client_of_request() == "radiology-pacs"

    contextvars.Context().run(check)


def test_grpc_peers_are_keyed_by_host_without_the_port():
    from medlego.serving.grpc_service import peer_host

    class Ctx:
        def __init__(self, peer):
            self._peer = peer

        def peer(self):
            return self._peer

    assert peer_host(Ctx("ipv4:10.0.0.7:51234")) == "ipv4:10.0.0.7"  # two connections of one host: one turn
    assert peer_host(Ctx("ipv6:[::1]:40000")) == "ipv6:[::1]"
    assert peer_host(Ctx("unix:/run/medlego.sock")) == "unix:/run/medlego.sock"
    assert peer_host(object()) == "" and peer_host(None) == ""  # Ray's proxy context, or none
