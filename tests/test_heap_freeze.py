"""A serving process freezes its startup heap once warm (serving/heap.py): a full collection then walks only
what was made since, instead of the ~450,000 objects of torch, the web stacks and the model. An embedded
server started inside another process leaves that process's heap alone."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from servers import start_server

_SERVE = textwrap.dedent("""
    import gc, os, signal, sys, threading
    sys.path.insert(0, {tests!r})
    from medlego.serving.server import EmbeddedServer
    from servers import TINY_MODEL
    from medlego.runtime.base import load_base
    from medlego.runtime.config import EngineConfig
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry
    from medlego.serving.service import DiagnosisService
    base = load_base(TINY_MODEL, {base!r})
    service = DiagnosisService(Engine(base, Registry({data!r}, base=base.spec), EngineConfig(slots=2)))
    server = EmbeddedServer(service, host="127.0.0.1", port=0, grpc_port=None)
    def report():
        server.ready.wait(120)
        print("frozen", gc.get_freeze_count(), "tracked", len(gc.get_objects()), flush=True)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=report, daemon=True).start()
    print("before", gc.get_freeze_count(), flush=True)
    server.run()
    print("stopped", flush=True)
""")


def test_a_serving_process_freezes_its_startup_heap_when_warm(tiny_base_file, tmp_path):
    script = _SERVE.format(tests=str(Path(__file__).parent), base=str(tiny_base_file), data=str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[:2] == ["before", "0"] and lines[-1] == "stopped"
    frozen, tracked = int(lines[lines.index("frozen") + 1]), int(lines[lines.index("tracked") + 1])
    # the model, torch and the libraries: nearly everything the warm process tracks is out of collections
    assert frozen > 100_000 and frozen > 0.9 * tracked


def test_an_embedded_server_leaves_its_host_process_heap_alone(tiny_base_file, tmp_path):
    before = gc.get_freeze_count()
    srv = start_server(tiny_base_file, tmp_path / "data")
    try:
        assert srv.ready.is_set()
        assert gc.get_freeze_count() == before
    finally:
        srv.stop()
