"""Per-tier metrics of the adapter pool (issue 30): device slot, host copy, node (local disk or the
node cache) and store (an S3 download), each with hits, misses, load time and bytes, as Prometheus
families; on the fleet pair (PostgreSQL + S3), with a node cache that evicts by size."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from medlego.runtime.config import EngineConfig
from medlego.runtime.engine import Engine
from medlego.serving.metrics import metrics_registry, render


def _families(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_tiers_are_counted_and_exported(fleet_backend, tiny_base, make_adapter, tmp_path):
    reg = fleet_backend.open(base=tiny_base.spec)
    entries = reg.register_many([(f"t{i}", make_adapter(seed=i).to_bytes()) for i in range(3)])
    node = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "node")
    engine = Engine(tiny_base, node, EngineConfig(slots=1, host_capacity=1))
    image = torch.zeros(3, tiny_base.input_size, tiny_base.input_size)
    for ref in ("t0", "t1", "t2", "t0"):  # one slot, one host copy: t0 is read again, from the node cache now
        engine.run([engine.request(image, ref)])
    c = engine.counters
    assert c.get("pool_hits", tier="store") == 3 and c.get("pool_misses", tier="node") == 3
    assert c.get("pool_hits", tier="node") == 1 and c.get("pool_misses", tier="host") == 4
    assert c.get("pool_loaded_bytes", tier="store") == sum(e.size for e in entries)
    assert c.get("pool_loaded_bytes", tier="device") > 0
    text = render(metrics_registry(SimpleNamespace(engine=engine, inflight=0))).decode()
    f = _families(text)
    for tier in ("device", "host", "node", "store"):
        assert f'medlego_pool_load_seconds_count{{tier="{tier}"}}' in f, tier
    assert f['medlego_pool_hit_ratio{tier="node"}'] == 1 / 4
    assert f['medlego_pool_loaded_bytes_total{tier="host"}'] > 0


def test_the_node_cache_scans_its_folder_only_when_it_may_be_full(tmp_path):
    from medlego.runtime.registry.node_cache import RESCAN_PUTS, NodeCache

    cache = NodeCache(tmp_path / "c", max_bytes=10_000)
    scans = []
    real = cache._files
    cache._files = lambda: scans.append(1) or real()  # type: ignore[method-assign]
    blob = b"x" * 1000
    for i in range(9):
        cache.put(f"{i:064x}", blob)
    assert len(scans) == 1  # the first put learns the folder's size; the next eight fit without a scan
    for i in range(9, 12):
        cache.put(f"{i:064x}", blob)
    assert cache.size() <= 10_000 and len(scans) >= 2  # over the limit: scanned and evicted to the low-water mark
    assert RESCAN_PUTS > 12


def test_host_copies_own_their_memory_though_parses_borrow_the_file_bytes(tiny_base, make_adapter):
    """The pool parses every file as views of its bytes; what it keeps must be copies, not those views."""
    from medlego.runtime.pool import AdapterPool

    pool = AdapterPool(tiny_base.spec, slots=2, max_rank=8)
    # ranks that differ between matrices (the zero-padded packing), and one rank everywhere (the stacked one)
    made = {f"{i:064x}": make_adapter(seed=i, rank=[1 + (i + j) % 8 for j in range(2 * tiny_base.depth)] if i % 2 else 4)
            for i in range(4)}
    files = {sha: bytearray(ad.to_bytes()) for sha, ad in made.items()}  # writable, to be overwritten below
    hosts = {sha: pool.host(sha, lambda sha=sha: files[sha]) for sha in made}
    for data in files.values():  # a host copy still viewing its file's bytes would change with them
        data[8 + int.from_bytes(data[:8], "little"):] = bytes(len(data) - 8 - int.from_bytes(data[:8], "little"))
    for sha, ad in made.items():
        h = hosts[sha]
        for i, q in enumerate(ad.q):
            assert torch.equal(h.a[i, 0, :q.rank], q.A) and torch.equal(h.b[i, 0, :, :q.rank], q.B)
            assert torch.equal(h.e[i, 0, :q.rank], q.E) and not h.e[i, 0, q.rank:].any()
        task = h.task(None)
        assert task == ad.tasks[0] and h.preprocess == ad.preprocess
        assert torch.equal(h.heads[task.name][0], ad.heads[task.name].weight)
