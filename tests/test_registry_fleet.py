"""Two nodes on one registry: what one writes, the other sees at its next resolve; the node-local
cache of an S3 store is bounded, verified, and never the source of truth."""

import pytest

from medlego.runtime.adapter import sha256_hex
from medlego.runtime.errors import AdapterFormatError, AdapterNotFoundError, BadInputError, StorageUnavailableError


def test_a_node_sees_the_other_nodes_writes_at_its_next_resolve(backend, make_adapter, tmp_path):
    ops = backend.open()
    replica = backend.open(cache_dir=tmp_path / "replica")  # its own cache, as on another machine
    ops.register("blood", make_adapter(seed=1, rank=2).to_bytes())
    ops.set_alias("general", "blood@1")
    assert replica.resolve("general").ref == "blood@1"
    assert replica.read_bytes(replica.resolve("blood")) == ops.read_bytes(ops.resolve("blood@1"))
    ops.register("blood", make_adapter(seed=2, rank=2).to_bytes())
    assert replica.resolve("blood").version == 2  # the latest version moved
    ops.set_alias("general", "blood@2")
    assert replica.resolve("general").ref == "blood@2"  # the alias moved
    ops.pin("blood@2")
    assert replica.resolve("general").pinned
    ops.unpin("blood@2")
    ops.set_alias("general", "blood@1")
    ops.delete("blood", 2)
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'blood@2'"):
        replica.resolve("blood@2")  # a delete elsewhere is a 404 here at once
    assert replica.resolve("blood").version == 1
    ops.remove_alias("general")
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'general'"):
        replica.resolve("general")


def test_an_entry_resolved_before_a_delete_elsewhere_fails_as_not_found(backend, make_adapter, tmp_path):
    ops, replica = backend.open(), backend.open(cache_dir=tmp_path / "replica")
    ops.register("blood", make_adapter(seed=1, rank=2).to_bytes())
    entry = replica.resolve("blood")
    ops.delete("blood")
    with pytest.raises(AdapterNotFoundError, match="blood@1 is no longer in the store"):
        replica.read_bytes(entry)


def test_the_node_cache_is_bounded_and_evicts_the_least_recently_used(fleet_backend, make_adapter, tmp_path):
    reg = fleet_backend.open()
    entries = [reg.register(f"a{i}", make_adapter(seed=i, rank=2).to_bytes()) for i in range(4)]
    limit = int(entries[0].size * 2.5)  # room for two
    node = fleet_backend.open(cache_dir=tmp_path / "node", cache_max_bytes=limit)
    cache = node._store.cache
    for e in entries[:2]:
        node.read_bytes(e)
    node.read_bytes(entries[0])  # a0 is now more recent than a1
    node.read_bytes(entries[2])
    assert {p.name[:64] for p in cache.root.glob("*.safetensors")} == {entries[0].sha256, entries[2].sha256}
    assert cache.size() <= limit
    assert node.read_bytes(entries[1]) == reg.read_bytes(entries[1])  # evicted: downloaded again
    assert cache.size() <= limit


def test_downloads_are_verified_and_a_damaged_cache_file_is_fetched_again(fleet_backend, make_adapter, tmp_path):
    reg = fleet_backend.open()
    good = reg.register("blood", make_adapter(seed=1, rank=2).to_bytes())
    node = fleet_backend.open(cache_dir=tmp_path / "node")
    data = node.read_bytes(good)
    cached = node._store.cache.path(good.sha256)
    cached.write_bytes(b"rotten")  # a damaged local disk
    assert node.read_bytes(good) == data and cached.read_bytes() == data
    fleet_backend.put_raw(f"{good.sha256}.safetensors", b"not what was registered")  # the bucket changed behind us
    other = fleet_backend.open(cache_dir=tmp_path / "other-node")
    with pytest.raises(AdapterFormatError, match="does not match its sha256; the store is corrupt"):
        other.read_bytes(good)
    assert not other._store.cache.path(good.sha256).exists()  # never cached


def test_local_path_is_a_file_with_the_verified_bytes(backend, make_adapter):
    reg = backend.open()
    e = reg.register("blood", make_adapter(seed=1, rank=2).to_bytes())
    path = reg.local_path(e)
    assert path.is_file() and sha256_hex(path.read_bytes()) == e.sha256


def test_index_and_store_are_independent_choices(postgres_url, s3_bucket, tmp_path, make_adapter):
    from medlego.runtime.registry import Registry

    data = make_adapter(seed=1, rank=2).to_bytes()
    for url, store in ((None, f"s3://{s3_bucket}/x"), (postgres_url, None)):
        reg = Registry(tmp_path / str(url is None), url=url, store=store)
        assert reg.read_bytes(reg.register("blood", data)) == data
        assert [e.ref for e in reg.list()] == ["blood@1"]


def test_unusable_urls_fail_in_one_line(tmp_path, s3_server):
    from medlego.runtime.registry import Registry

    cases = [({"url": "mysql://db/x"}, BadInputError, "unsupported registry URL 'mysql://db/x'"),
             ({"url": "postgresql://u:secret@127.0.0.1:1/x"}, StorageUnavailableError,
              r"cannot reach the registry database postgresql://u:\*\*\*@127.0.0.1:1/x: connection failed"),
             ({"store": "gs://bucket"}, BadInputError, "unsupported store URL 'gs://bucket'"),
             ({"store": "s3:///prefix"}, BadInputError, "name the bucket"),
             ({"store": "s3://no-such-bucket/p"}, BadInputError, "S3 bucket 'no-such-bucket' does not exist")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as info:
            Registry(tmp_path, **kwargs)
        assert "\n" not in str(info.value) and "secret" not in str(info.value)


def test_a_resolve_is_one_statement_once_the_objects_metadata_is_cached(backend, make_adapter):
    reg = backend.open()
    reg.register("blood", make_adapter(seed=1, rank=2).to_bytes())
    reg.set_alias("general", "blood")
    reg.resolve("blood")  # the first resolve of an object also reads its (immutable) metadata
    statements = []
    read = reg._index.read
    reg._index.read = lambda sql, params=(): statements.append(sql) or read(sql, params)
    assert [reg.resolve(ref).ref for ref in ("blood", "blood@1", "general")] == ["blood@1"] * 3
    assert len(statements) == 3
