"""Registry: versions, aliases, pins, deletes, validation, crash safety, two processes at once —
on both backend pairs (SQLite + folder, PostgreSQL + S3; see tests/backends.py)."""

import json
import multiprocessing as mp
import subprocess
import sys
import textwrap

import pytest

from medlego.runtime.adapter import parse_adapter
from medlego.runtime.errors import (AdapterFormatError, AdapterNotFoundError, AdapterPinnedError, ConflictError,
                                    IncompatibleAdapterError)
from medlego.runtime.registry import Registry


def test_versions_aliases_pins_delete(backend, tiny_base, make_adapter):
    reg = backend.open(base=tiny_base.spec, input_size=tiny_base.input_size)
    a, b = make_adapter(seed=1), make_adapter(seed=2)
    e1 = reg.register("blood", a.to_bytes())
    e2 = reg.register("blood", b.to_bytes())
    assert (e1.version, e2.version) == (1, 2)
    assert reg.resolve("blood").version == 2 and reg.resolve("blood@1").sha256 == e1.sha256
    assert reg.read_bytes(e1) == a.to_bytes() and f"{e1.sha256}.safetensors" in backend.stored()
    reg.set_alias("general", "blood@1")
    assert reg.resolve("general").ref == "blood@1"
    reg.set_alias("general", "blood@2")  # roll forward
    assert reg.resolve("general").ref == "blood@2"
    with pytest.raises(ConflictError, match="alias 'general'"):
        reg.delete("blood", 2)
    reg.set_alias("general", "blood@1")  # roll back
    reg.pin("blood@2")
    with pytest.raises(AdapterPinnedError, match="pinned"):
        reg.delete("blood", 2)
    reg.unpin("blood@2")
    reg.delete("blood", 2)
    assert backend.stored() == [f"{e1.sha256}.safetensors"]  # no row references e2's object any more
    assert reg.resolve("blood").version == 1
    with pytest.raises(AdapterNotFoundError, match=r"^unknown adapter 'blood@2': 'blood' has no version 2 \(its latest is blood@1\)$"):
        reg.resolve("blood@2")
    assert [e.ref for e in reg.list()] == ["blood@1"] and len(reg) == 1
    d = reg.describe("blood")
    assert d["aliases"] == ["general"] and d["tasks"][0]["name"] == "task1" and d["lora_params"] == a.lora_params
    reg.set_alias("general", "blood@1")
    with pytest.raises(ConflictError, match="alias 'general' points at blood@1; move or remove the alias first"):
        reg.delete("blood")
    reg.remove_alias("general")
    assert [e.ref for e in reg.delete("blood")] == ["blood@1"] and reg.list() == [] and backend.stored() == []


def test_registration_validates_against_the_base(backend, tiny_base, make_adapter, other_base_file):
    from medlego.jobs.synthetic import random_adapter
    from medlego.runtime.base import load_base

    reg = backend.open(base=tiny_base.spec, max_rank=4, input_size=tiny_base.input_size)
    other = load_base("vit_tiny_patch16_224", other_base_file)
    foreign = random_adapter(other.spec, other.preprocess, seed=0)
    with pytest.raises(IncompatibleAdapterError, match="resident base"):
        reg.register("x", foreign.to_bytes())
    with pytest.raises(AdapterFormatError, match="rank 8, above the configured maximum 4"):
        reg.register("x", make_adapter(rank=8).to_bytes())
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        reg.register("x", b"\x80\x04definitely a pickle")
    assert reg.list() == [] and backend.stored() == []  # nothing written


_DIE_BEFORE_RENAME = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from medlego.runtime.registry import Registry
    reg = Registry(sys.argv[1])
    data = Path(sys.argv[2]).read_bytes()
    os.replace = lambda *a, **k: os._exit(9)   # die between the temp write and its rename
    reg.register("half", data)
""")


def test_registration_killed_before_its_rename_leaves_no_trace(tmp_path, make_adapter):
    src = tmp_path / "a.safetensors"
    src.write_bytes(make_adapter(seed=5).to_bytes())
    data_dir = tmp_path / "data"
    Registry(data_dir)
    proc = subprocess.run([sys.executable, "-c", _DIE_BEFORE_RENAME, str(data_dir), str(src)])
    assert proc.returncode == 9
    temps = list((data_dir / "store").glob(".*.tmp"))
    assert len(temps) == 1  # the dying process left exactly its temp file
    reg = Registry(data_dir)  # reopening cleans it up
    assert list((data_dir / "store").iterdir()) == []
    assert reg.list() == []
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("half")


_DIE_BEFORE_COMMIT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from medlego.runtime.registry import Registry
    reg = Registry(sys.argv[1], **json.loads(sys.argv[3]))
    data = Path(sys.argv[2]).read_bytes()
    put = reg._store.put
    reg._store.put = lambda sha, data: (put(sha, data), os._exit(9))  # the object is stored, its row never commits
    reg.register("half", data)
""")


def test_registration_killed_before_its_commit_leaves_an_orphan_that_gc_removes(backend, make_adapter, tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(make_adapter(seed=5).to_bytes())
    backend.open()
    proc = subprocess.run([sys.executable, "-c", _DIE_BEFORE_COMMIT, str(backend.data_dir), str(src),
                           json.dumps(backend.spec)])
    assert proc.returncode == 9
    assert len(backend.stored()) == 1  # the orphan object
    reg = backend.open()
    assert reg.list() == []
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("half")
    assert len(reg.gc()["objects_removed"]) == 1 and backend.stored() == []


def _writer(data_dir, spec, payloads, n):
    reg = Registry(data_dir, **spec)
    for i in range(n):
        reg.register("shared", payloads[i % len(payloads)])


def _reader(data_dir, spec, n, q):
    reg = Registry(data_dir, **spec)
    seen, bad = 0, 0
    for _ in range(n):
        try:
            e = reg.resolve("shared")
        except AdapterNotFoundError:
            continue
        try:
            parse_adapter(reg.read_bytes(e))
            seen += 1
        except Exception:
            bad += 1
    q.put((seen, bad))


def test_two_processes_register_and_read_at_once(backend, make_adapter):
    payloads = [make_adapter(seed=s, rank=2).to_bytes() for s in range(3)]
    data_dir = str(backend.data_dir)
    backend.open()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(data_dir, backend.spec, payloads, 20)),
             ctx.Process(target=_writer, args=(data_dir, backend.spec, payloads, 20)),
             ctx.Process(target=_reader, args=(data_dir, backend.spec, 150, q))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    seen, bad = q.get(timeout=5)
    assert bad == 0 and seen > 0
    versions = [e.version for e in backend.open().list()]
    assert sorted(versions) == list(range(1, 41))  # every registration got its own version


def test_a_registry_made_before_the_objects_table_works_unchanged(tmp_path, make_adapter):
    import sqlite3

    data = make_adapter(seed=6, rank=2).to_bytes()
    old = Registry(tmp_path)
    e = old.register("blood", data)
    old.close()
    with sqlite3.connect(tmp_path / "registry.db") as db:  # the layout of earlier releases
        db.execute("DROP TABLE objects")
    reg = Registry(tmp_path)
    assert reg.gc() == {"objects_removed": [], "temp_files_removed": 0}
    assert reg.read_bytes(reg.resolve("blood@1")) == data
    reg.register("copy", data)
    reg.delete("blood")
    assert reg.read_bytes(reg.resolve("copy")) == data
    reg.delete("copy")
    assert not (tmp_path / "store" / f"{e.sha256}.safetensors").exists()
