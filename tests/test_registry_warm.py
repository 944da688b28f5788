"""Warming a node (`medlego registry warm`): the files of registered adapters fetched from S3 into the
node cache before traffic needs them, each object once, within what the cache keeps; on the real
pair (PostgreSQL + moto's S3 over HTTP), and a no-op on the embedded folder store."""

from __future__ import annotations

from backends import s3_client

from medlego.cli import main
from medlego.runtime.registry import Filters
from medlego.runtime.registry.node_cache import LOW_WATER


def _register(backend, tiny_base, make_adapter) -> list:
    reg = backend.open(base=tiny_base.spec)
    same = make_adapter(seed=9).to_bytes()
    return reg.register_many([(f"site{i}", make_adapter(seed=i).to_bytes()) for i in range(4)]
                             + [("copy-a", same), ("copy-b", same)])  # two versions, one object


def test_warm_fetches_each_object_once_then_reads_come_from_the_node(fleet_backend, tiny_base, make_adapter, tmp_path):
    entries = _register(fleet_backend, tiny_base, make_adapter)
    node = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "node")
    r = node.warm(workers=3)
    assert (r.versions, r.objects, r.fetched, r.cached, r.missing, r.left_out) == (6, 5, 5, 0, 0, 0)
    assert r.bytes_fetched == sum({e.sha256: e.size for e in entries}.values())
    assert sorted(p.name[:64] for p in (tmp_path / "node").glob("*.safetensors")) == sorted({e.sha256 for e in entries})
    for e in entries:
        data, tier = node.read_tiered(e)
        assert tier == "node" and len(data) == e.size
    again = node.warm()
    assert (again.fetched, again.cached) == (0, 5)
    only = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "other").warm(Filters(prefix="copy"))
    assert (only.versions, only.objects, only.fetched) == (2, 1, 1)


def test_warm_stops_where_the_cache_would_evict_what_it_warmed(fleet_backend, tiny_base, make_adapter, tmp_path):
    entries = _register(fleet_backend, tiny_base, make_adapter)
    size = max(e.size for e in entries)
    node = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "node",
                              cache_max_bytes=int(2.5 * size / LOW_WATER))  # room for two files
    r = node.warm(workers=2)
    assert (r.fetched, r.left_out) == (2, 3) and r.room_bytes is not None and r.bytes_fetched <= r.room_bytes
    cached = sorted(p.name[:64] for p in (tmp_path / "node").glob("*.safetensors"))
    assert cached == sorted({e.sha256: e for e in entries if e.name in ("copy-a", "site0")})  # listing order
    none = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "tiny", cache_max_bytes=size // 2).warm()
    assert (none.versions, none.objects, none.left_out, none.fetched) == (6, 5, 5, 0)  # copy-a/-b: one file


def test_an_object_gone_from_the_bucket_is_counted_missing(fleet_backend, tiny_base, make_adapter, tmp_path):
    entries = _register(fleet_backend, tiny_base, make_adapter)
    bucket, prefix = fleet_backend._bucket_prefix()
    s3_client().delete_object(Bucket=bucket, Key=f"{prefix}{entries[0].sha256}.safetensors")  # behind its back
    r = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "node").warm()
    assert (r.fetched, r.missing) == (4, 1)


def test_a_damaged_warm_file_is_fetched_again_when_read(fleet_backend, tiny_base, make_adapter, tmp_path):
    entries = _register(fleet_backend, tiny_base, make_adapter)
    node = fleet_backend.open(base=tiny_base.spec, cache_dir=tmp_path / "node")
    node.warm()
    path = tmp_path / "node" / f"{entries[1].sha256}.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    data, tier = node.read_tiered(entries[1])
    assert tier == "store" and data == fleet_backend.open().read_bytes(entries[1])


def test_cli_warm_on_both_backends_and_its_mistakes(backend, tiny_base, make_adapter, tmp_path, capsys):
    _register(backend, tiny_base, make_adapter)
    argv = ["registry", *backend.cli_args(), "--cache-dir", str(tmp_path / "node"), "warm"]
    assert main(argv + ["--prefix", "site"]) == 0
    out = capsys.readouterr().out
    if backend.store is None:
        assert out == "nothing to warm: the 4 matching versions are read from this machine's folder store\n"
    else:
        assert out.startswith(f"node cache {tmp_path / 'node'}: 4 fetched (") and "of 4 files for 4 matching versions" in out
    rc = main(argv + ["--workers", "0"])
    assert rc == 2 and capsys.readouterr().err == "medlego registry: error: bad number of workers 0: 1 to 64\n"
    rc = main(argv[:-1] + ["--cache-max-bytes", "0", "warm"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "medlego registry: error: bad --cache-max-bytes 0: a positive number of bytes\n"


def test_a_server_warms_its_base_adapters_on_start(fleet_backend, tiny_base, other_base_file, make_adapter, tmp_path):
    import time

    from medlego.jobs.synthetic import random_adapter
    from medlego.runtime.base import load_base
    from medlego.runtime.config import ServeConfig
    from medlego.serving.service import DiagnosisService

    ours = _register(fleet_backend, tiny_base, make_adapter)
    other = load_base(tiny_base.spec.model, other_base_file)
    theirs = fleet_backend.open(base=other.spec).register(
        "elsewhere", random_adapter(other.spec, other.preprocess, seed=3).to_bytes())
    cfg = ServeConfig()
    cfg.server.data_dir = str(tmp_path / "server")
    cfg.registry.url, cfg.registry.store = fleet_backend.url, fleet_backend.store
    cfg.registry.cache_dir, cfg.registry.warm_on_start = str(tmp_path / "node"), True
    service = DiagnosisService.from_config(cfg, base=tiny_base)
    try:
        want = sorted({e.sha256 for e in ours})
        deadline = time.monotonic() + 30
        while (got := sorted(p.name[:64] for p in (tmp_path / "node").glob("*.safetensors"))) != want:
            assert time.monotonic() < deadline, f"warmed {got}, want {want}"
            time.sleep(0.05)
        assert theirs.sha256 not in got  # another base's adapter is not this server's to serve
    finally:
        service.close()


def test_warm_on_start_settings_are_checked():
    import pytest

    from medlego.runtime.config import RegistryConfig, apply_section
    from medlego.runtime.errors import BadInputError
    from medlego.serving.ray_app import app_builder

    with pytest.raises(BadInputError, match=r"warm_on_start"):
        apply_section(RegistryConfig(), "registry", {"warm_on_start": "yes"})
    with pytest.raises(BadInputError, match=r"^app arg registry_warm_on_start must be true or false, got 'false'$"):
        app_builder({"registry_warm_on_start": "false"})
