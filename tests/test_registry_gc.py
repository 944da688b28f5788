"""gc: orphans go, referenced objects and in-flight registrations stay, stale temp files go."""

import os
import subprocess
import sys
import threading
import time

from medlego.runtime.adapter import sha256_hex


def test_gc_removes_orphans_and_keeps_every_referenced_object(backend, make_adapter):
    reg = backend.open()
    kept = reg.register("blood", make_adapter(seed=1, rank=2).to_bytes())
    orphan = make_adapter(seed=2, rank=2).to_bytes()
    backend.put_raw(f"{sha256_hex(orphan)}.safetensors", orphan)  # e.g. a registration killed before its commit
    assert reg.gc() == {"objects_removed": [sha256_hex(orphan)], "temp_files_removed": 0}
    assert backend.stored() == [f"{kept.sha256}.safetensors"] and reg.read_bytes(reg.resolve("blood"))
    assert reg.gc() == {"objects_removed": [], "temp_files_removed": 0}


def test_gc_never_removes_the_object_of_a_registration_in_flight(backend, make_adapter):
    """The registration is held inside its transaction, its object already stored, while gc runs:
    gc waits on the object's row and then sees the new reference."""
    reg = backend.open()
    data = make_adapter(seed=3, rank=2).to_bytes()
    stored, release = threading.Event(), threading.Event()
    put = reg._store.put

    def put_then_wait(sha, blob):
        put(sha, blob)
        stored.set()
        assert release.wait(30)

    reg._store.put = put_then_wait
    registering = threading.Thread(target=reg.register, args=("late", data))
    registering.start()
    assert stored.wait(30)
    gc_result = []
    collecting = threading.Thread(target=lambda: gc_result.append(backend.open().gc()))
    collecting.start()
    time.sleep(0.5)  # gc has listed the object as unreferenced and waits for its row
    release.set()
    registering.join(30)
    collecting.join(30)
    assert gc_result == [{"objects_removed": [], "temp_files_removed": 0}]
    assert backend.open().read_bytes(backend.open().resolve("late")) == data


def test_gc_finishes_a_delete_whose_process_died_before_removing_the_object(backend, make_adapter):
    reg = backend.open()
    e = reg.register("blood", make_adapter(seed=4, rank=2).to_bytes())
    reg._reap = lambda sha: False  # the deleting process dies right after its commit
    reg.delete("blood")
    assert backend.stored() == [f"{e.sha256}.safetensors"]
    assert backend.open().gc()["objects_removed"] == [e.sha256] and backend.stored() == []


_HOLD_A_TEMP_FILE = """
import os, sys, time
from pathlib import Path
store = Path(sys.argv[1])
(store / f".{os.getpid()}@{os.uname().nodename}-{'0' * 16}.upload.tmp").write_bytes(b"half")
print("ready", flush=True)
time.sleep(60)
"""


def test_temp_files_go_when_their_writer_is_dead_or_they_are_old(tmp_path, make_adapter):
    from medlego.runtime.registry import Registry

    reg = Registry(tmp_path)
    store = tmp_path / "store"
    dead = store / f".999999999@{os.uname().nodename}-{'1' * 16}.abc.tmp"  # no such pid
    foreign_fresh = store / f".12@other-host-{'2' * 16}.abc.tmp"  # another host's upload in progress
    foreign_old = store / f".13@other-host-{'3' * 16}.abc.tmp"
    for p in (dead, foreign_fresh, foreign_old):
        p.write_bytes(b"half")
    os.utime(foreign_old, (time.time() - 7200, time.time() - 7200))
    writer = subprocess.Popen([sys.executable, "-c", _HOLD_A_TEMP_FILE, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        assert reg.gc(grace_s=3600)["temp_files_removed"] == 2  # the dead writer's and the old one
        remaining = sorted(p.name for p in store.iterdir())
        assert foreign_fresh.name in remaining and len(remaining) == 2  # and the live writer's
    finally:
        writer.kill()
        writer.wait()
