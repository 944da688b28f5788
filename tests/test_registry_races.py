"""Writers racing each other on one registry, in threads and in processes, on both backends.

The first test is the bug this protocol fixes: registering bytes X under one name while the last
other name holding X is deleted used to delete the file the new version relies on (listed, but
unservable). It failed within a few dozen rounds on the old registry."""

import multiprocessing as mp
import threading
import time

import pytest

from medlego.runtime.errors import AdapterNotFoundError, ConflictError

ROUNDS = 25
WORKERS = 4


def _churn(backend, reg, name: str, data: bytes, rounds: int) -> list[str]:
    """Register `data` as `name`, check the store has it, delete it; the versions whose object was missing.

    The store is asked directly: this node's cache would still serve bytes that the store lost."""
    lost = []
    for _ in range(rounds):
        e = reg.register(name, data)
        if not backend.holds(e.sha256):
            lost.append(e.ref)
        reg.delete(name)
    return lost


def _assert_consistent(backend, reg):
    """Every listed version is servable and the store holds exactly the referenced objects."""
    entries = reg.list()
    for e in entries:
        reg.read_bytes(e)
    assert backend.stored() == sorted({f"{e.sha256}.safetensors" for e in entries})


def _run(threads):
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()


def test_threads_registering_and_deleting_identical_bytes_never_lose_a_file(backend, make_adapter):
    reg = backend.open()
    data = make_adapter(seed=1, rank=2).to_bytes()
    reg.register("keeper", make_adapter(seed=2, rank=2).to_bytes())
    lost: list[str] = []
    _run([threading.Thread(target=lambda k=k: lost.extend(_churn(backend, reg, f"n{k}", data, ROUNDS)))
          for k in range(WORKERS)])
    assert lost == []
    assert [e.ref for e in reg.list()] == ["keeper@1"]
    _assert_consistent(backend, reg)


def test_with_a_slow_store_the_race_windows_are_wide_and_still_no_file_is_lost(backend, make_adapter):
    """The store's round trips stretched to milliseconds, as on a loaded network: a registration
    that checked for the object, and a reap that checked for references, now overlap often."""
    reg = backend.open()
    store = reg._store
    exists, delete = store.exists, store.delete

    def slow_exists(sha):
        found = exists(sha)
        time.sleep(0.003)
        return found

    def slow_delete(sha):
        time.sleep(0.003)
        delete(sha)

    store.exists, store.delete = slow_exists, slow_delete
    data = make_adapter(seed=1, rank=2).to_bytes()
    lost: list[str] = []
    _run([threading.Thread(target=lambda k=k: lost.extend(_churn(backend, reg, f"n{k}", data, ROUNDS)))
          for k in range(WORKERS)])
    assert lost == [] and reg.list() == []
    _assert_consistent(backend, reg)


def _churn_process(backend, name, data, rounds, q):
    q.put(_churn(backend, backend.open(), name, data, rounds))


def test_processes_registering_and_deleting_identical_bytes_never_lose_a_file(backend, make_adapter):
    data = make_adapter(seed=1, rank=2).to_bytes()
    backend.open().register("stays", data)  # one lasting reference among the churn
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_churn_process, args=(backend, f"p{k}", data, 15, q))
             for k in range(3)]
    _run(procs)
    assert all(p.exitcode == 0 for p in procs)
    assert [q.get(timeout=10) for _ in procs] == [[], [], []]
    reg = backend.open()
    assert [e.ref for e in reg.list()] == ["stays@1"]
    _assert_consistent(backend, reg)


def test_registrations_of_one_name_at_once_get_distinct_consecutive_versions(backend, make_adapter):
    reg = backend.open()
    payloads = [make_adapter(seed=s, rank=2).to_bytes() for s in range(WORKERS)]
    versions: list[int] = []
    _run([threading.Thread(target=lambda d=d: versions.extend(reg.register("shared", d).version for _ in range(5)))
          for d in payloads])
    assert sorted(versions) == list(range(1, 5 * WORKERS + 1))
    _assert_consistent(backend, reg)


def _race(*fns):
    """Run fns at the same moment; each one's result or MedlegoError."""
    barrier, out = threading.Barrier(len(fns)), [object()] * len(fns)

    def run(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except ConflictError as e:
            out[i] = e
        except AdapterNotFoundError as e:
            out[i] = e

    _run([threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)])
    return out


def test_an_alias_and_an_adapter_never_take_one_name_at_once(backend, make_adapter):
    reg = backend.open()
    data = make_adapter(seed=1, rank=2).to_bytes()
    reg.register("target", data)
    for i in range(10):
        name = f"contested{i}"
        made, aliased = _race(lambda: reg.register(name, data), lambda: reg.set_alias(name, "target@1"))
        assert isinstance(made, ConflictError) != isinstance(aliased, ConflictError)  # exactly one won
        is_adapter = any(e.name == name for e in reg.list())
        assert is_adapter != (name in reg.aliases())


def test_an_alias_never_points_at_a_version_deleted_at_the_same_moment(backend, make_adapter):
    reg = backend.open()
    data = make_adapter(seed=1, rank=2).to_bytes()
    for i in range(10):
        name = f"v{i}"
        reg.register(name, data)
        _race(lambda: reg.delete(name, 1), lambda: reg.set_alias("moving", f"{name}@1"))
        aliases = reg.aliases()
        if aliases.get("moving") == f"{name}@1":  # the alias won: the version must still be there
            assert reg.resolve("moving").ref == f"{name}@1"
            reg.remove_alias("moving")
            reg.delete(name, 1)
        with pytest.raises(AdapterNotFoundError):
            reg.resolve(name)
    _assert_consistent(backend, reg)
