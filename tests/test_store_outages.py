"""Store outages and full disks against real servers: a moto S3 server in its own process that the
tests freeze (SIGSTOP) and thaw (SIGCONT), and tiny tmpfs file systems that really fill up.

What must hold (issue 24, items 5 and 7): while S3 hangs, an adapter already in memory keeps being
diagnosed quickly, a cold load answers 503 within a bound without taking the decode workers, and a
registration answers 503 within ~10 s; after the thaw everything works again. A full disk answers
507 with a one-line reason and leaves no partial file; a full node cache still serves.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from backends import _unavailable, free_port
from conftest import TINY_MODEL
from medlego.jobs.synthetic import encode_png, random_adapter, random_image
from medlego.runtime.base import load_base
from medlego.runtime.config import BatchingConfig, EngineConfig
from medlego.runtime.engine import Engine
from medlego.runtime.errors import StorageFullError
from medlego.runtime.registry import Registry
from medlego.runtime.registry.index_sqlite import SqliteIndex
from medlego.serving.auth import Auth
from medlego.serving.server import EmbeddedServer
from medlego.serving.service import DiagnosisService
from servers import HealthProbe
from waiting import wait_until

ADMIN = "outage-admin-token"
API = "outage-api-token"
HOT_BOUND_S = 3.0  # an adapter in memory is answered within this while the store hangs
COLD_BOUND_S = 12.0  # a cold load's 503: load_timeout_s (10 s) plus scheduling
REGISTER_BOUND_S = 10.5  # a registration's 503: two store attempts of ≤ 3 s reads (+ back-off)


# -- servers ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_process():
    """moto's S3 server in a process of its own, so that it can be frozen and thawed by signal."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _unavailable("S3 server (moto, own process)", e)
            time.sleep(0.1)
    yield proc, f"http://127.0.0.1:{port}"
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(moto_process, monkeypatch):
    """A fresh bucket on the own-process moto; the AWS_* variables point every client at it.
    Yields (process, bucket); the process is thawed again whatever the test did."""
    from boto3.session import Session

    proc, endpoint = moto_process
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "medlego-test",
                 "AWS_SECRET_ACCESS_KEY": "medlego-test", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"outage-{os.getpid()}-{time.monotonic_ns()}"
    Session().client("s3", region_name="us-east-1", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield proc, bucket
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def tiny_disk(path: Path, size: str) -> Path:
    """A tmpfs of `size` mounted at `path` (root only: CI runs as root); skipped where it cannot be."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        _unavailable("a tiny tmpfs (mount -t tmpfs)", OSError(proc.stderr.strip() or f"mount exited {proc.returncode}"))
    return path


@pytest.fixture
def disks(tmp_path):
    """tiny_disk(name, size) → a mounted tmpfs under tmp_path; all are unmounted at the end."""
    mounted = []

    def make(name: str, size: str) -> Path:
        mounted.append(tiny_disk(tmp_path / name, size))
        return mounted[-1]

    yield make
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill the file system of `disk` to the last byte with one file (returned; delete it to free the space)."""
    filler = disk / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def start(base_file, data_dir, *, decode_workers=2, **registry) -> EmbeddedServer:
    base = load_base(TINY_MODEL, base_file)
    reg = Registry(data_dir, base=base.spec, max_rank=16, input_size=base.input_size, **registry)
    service = DiagnosisService(Engine(base, reg, EngineConfig(slots=8)), auth=Auth(admin_token=ADMIN),
                               batching=BatchingConfig(max_batch=16, max_wait_ms=3, decode_workers=decode_workers))
    return EmbeddedServer(service, host="127.0.0.1", port=0, grpc_port=None).start()


PNG = encode_png(random_image(1, 32))


def diagnose(url: str, ref: str, timeout: float = 60) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/diagnose", files={"file": ("x.png", PNG)}, data={"adapter": ref}, timeout=timeout)
    return r.status_code, time.perf_counter() - t0, r.text


def register(url: str, name: str, data: bytes, timeout: float = 60) -> tuple[int, float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/adapters", files={"file": ("a.safetensors", data)}, data={"name": name},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=timeout)
    return r.status_code, time.perf_counter() - t0, r.json()


# -- a hung S3 ----------------------------------------------------------------------------------------
def test_hung_store_keeps_memory_serving_and_bounds_cold_loads_and_registration(s3, tmp_path, tiny_base,
                                                                                tiny_base_file):
    proc, bucket = s3
    store = f"s3://{bucket}/adapters"
    adapters = {name: random_adapter(tiny_base.spec, tiny_base.preprocess, seed=40 + i).to_bytes()
                for i, name in enumerate(["hot", "cold1", "cold2", "cold3"])}
    seed_reg = Registry(tmp_path / "data", store=store, cache_dir=tmp_path / "seed-cache")
    for name, data in adapters.items():
        seed_reg.register(name, data)
    server = start(tiny_base_file, tmp_path / "data", store=store, cache_dir=tmp_path / "cache")
    try:
        assert diagnose(server.url, "hot")[0] == 200  # now in memory
        os.kill(proc.pid, signal.SIGSTOP)  # S3 hangs: connections are accepted, nothing is answered
        engine = server.service.engine
        with HealthProbe(server.url) as probe, cf.ThreadPoolExecutor(6) as pool:
            # more cold loads than decode workers (2), one of them asked twice
            cold = [pool.submit(diagnose, server.url, ref) for ref in ("cold1", "cold2", "cold1", "cold3")]
            upload = pool.submit(register, server.url, "new",
                                 random_adapter(tiny_base.spec, tiny_base.preprocess, seed=99).to_bytes())
            time.sleep(0.5)  # the cold loads are under way
            entry = engine.registry.resolve("cold1")
            assert engine.load(entry) is engine.load(entry)  # one load per sha256, shared
            hot = []
            while not all(f.done() for f in cold):
                hot.append(diagnose(server.url, "hot", timeout=30))
            cold_answers = [f.result() for f in cold]
            reg_status, reg_s, reg_body = upload.result()
        probe.assert_fast()  # liveness never waited on the hung store
        assert hot and all(status == 200 for status, _, _ in hot), hot
        assert max(s for _, s, _ in hot) < HOT_BOUND_S, [round(s, 2) for _, s, _ in hot]
        for status, seconds, text in cold_answers:
            assert status == 503 and seconds < COLD_BOUND_S, (status, seconds, text)
            assert "store" in text and "\\n" not in text
        assert reg_status == 503 and reg_s < REGISTER_BOUND_S, (reg_status, reg_s, reg_body)
        assert reg_body["type"] == "StorageUnavailableError"
        os.kill(proc.pid, signal.SIGCONT)
        assert "new" not in {e.name for e in seed_reg.list()}  # nothing was registered
        for ref in ("cold1", "cold2", "cold3", "hot"):
            status, _, text = diagnose(server.url, ref)
            assert status == 200, text
        status, _, body = register(server.url, "new", random_adapter(tiny_base.spec, tiny_base.preprocess,
                                                                     seed=99).to_bytes())
        assert status == 201, body
        assert diagnose(server.url, "new")[0] == 200
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        server.stop()


# -- full disks -----------------------------------------------------------------------------------------
def test_full_data_disk_answers_507_and_writes_nothing(disks, tiny_base, tiny_base_file):
    data_dir = disks("data", "2m")
    first = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=1).to_bytes()
    second = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=2).to_bytes()
    server = start(tiny_base_file, data_dir)
    try:
        assert register(server.url, "first", first)[0] == 201
        filler = fill(data_dir)
        status, _, body = register(server.url, "second", second)
        assert status == 507, body
        assert body["type"] == "StorageFullError" and "no space left" in body["detail"]
        assert "\n" not in body["detail"]
        store = data_dir / "store"
        files = sorted(p.name for p in store.iterdir() if p.is_file())  # no temp file, no second object
        assert files == [f"{Registry(data_dir).resolve('first').sha256}.safetensors"]
        listing = httpx.get(server.url + "/v1/adapters", timeout=30).json()["adapters"]
        assert [a["ref"] for a in listing] == ["first@1"]
        assert diagnose(server.url, "first")[0] == 200  # reading needs no space
        filler.unlink()
        assert register(server.url, "second", second)[0] == 201
        assert diagnose(server.url, "second")[0] == 200
    finally:
        server.stop()


def test_full_disk_under_the_sqlite_index_is_507_and_rolls_back(disks):
    disk = disks("index", "1m")
    index = SqliteIndex(disk / "registry.db")
    row = ("big", 1, "0" * 64, 1, "2026-01-01T00:00:00Z")
    insert = "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, 0, ?)"
    filler = fill(disk)
    with pytest.raises(StorageFullError, match="no space left") as e:
        index.write(lambda tx: tx.run(insert, (*row, "x" * 600_000)))
    assert e.value.status == 507 and e.value.grpc_code == "RESOURCE_EXHAUSTED" and "\n" not in str(e.value)
    assert index.read("SELECT COUNT(*) FROM adapters") == [(0,)]
    filler.unlink()
    index.write(lambda tx: tx.run(insert, (*row, "{}")))  # the same connection works once there is room
    assert index.read("SELECT name FROM adapters") == [("big",)]
    index.close()


def test_full_disk_under_the_postgres_index_is_507_and_rolls_back(postgres_server):
    """PostgreSQL's own disk full (SQLSTATE 53100): the registry's tables live in a tablespace on a tiny
    tmpfs that really fills up; a write is 507 with one line, nothing of it stays, and the same index
    writes again once there is room."""
    import psycopg
    from psycopg import sql

    from backends import database_url
    from medlego.runtime.registry.index_postgres import PostgresIndex

    import shutil
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="medlego-pgdisk-"))  # not under pytest's 0700 tmp: the server's user reads it
    outside.chmod(0o755)
    disk = tiny_disk(outside / "disk", "4m")
    with psycopg.connect(postgres_server, autocommit=True) as admin:  # the server's own system user owns its data
        (data_directory,) = admin.execute("SHOW data_directory").fetchall()[0]
        owner = os.stat(data_directory)
    space = disk / "space"
    space.mkdir()
    os.chown(space, owner.st_uid, owner.st_gid)
    db, tablespace = f"full{os.getpid()}", f"tiny{os.getpid()}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(sql.Identifier(tablespace), sql.Literal(str(space))))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_tablespace = {}").format(sql.Identifier(db),
                                                                                  sql.Literal(tablespace)))
    index = PostgresIndex(database_url(postgres_server, db))  # its tables are created in the tiny tablespace
    try:
        row = ("big", 1, "0" * 64, 1, "2026-01-01T00:00:00Z")
        insert = "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, 0, ?)"
        filler = fill(disk)
        with pytest.raises(StorageFullError, match="no space left") as e:
            index.write(lambda tx: tx.run(insert, (*row, os.urandom(400_000).hex())))
        assert e.value.status == 507 and "\n" not in str(e.value) and "nothing was written" in str(e.value)
        assert index.read("SELECT COUNT(*) FROM adapters") == [(0,)]
        filler.unlink()
        index.write(lambda tx: tx.run(insert, (*row, "{}")))  # the same pool writes once there is room
        assert index.read("SELECT name FROM adapters") == [("big",)]
    finally:
        index.close()
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
            admin.execute(sql.SQL("DROP TABLESPACE {}").format(sql.Identifier(tablespace)))
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        shutil.rmtree(outside, ignore_errors=True)


def test_full_node_cache_serves_verified_bytes_from_memory(s3, disks, tmp_path, tiny_base, tiny_base_file, caplog):
    _, bucket = s3
    store = f"s3://{bucket}/adapters"
    data = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=7).to_bytes()
    Registry(tmp_path / "data", store=store, cache_dir=tmp_path / "seed-cache").register("cached", data)
    cache = disks("cache", "256k")
    filler = fill(cache)
    server = start(tiny_base_file, tmp_path / "data", store=store, cache_dir=cache)
    try:
        with caplog.at_level(logging.WARNING, logger="medlego.runtime.registry.store_s3"):
            status, _, text = diagnose(server.url, "cached")
        assert status == 200, text
        assert any("cannot keep adapter" in r.getMessage() for r in caplog.records), caplog.text
        assert sorted(p.name for p in cache.iterdir()) == [filler.name]  # no partial file left
    finally:
        server.stop()


# -- the database goes away -------------------------------------------------------------------------
class SocketRelay:
    """A unix-socket relay in front of PostgreSQL's own socket. ``down()`` closes its listener and
    every relayed connection, as when the database's host goes away (a connect is refused at once,
    an open connection breaks); ``up()`` listens again. The database behind it is the real one."""

    def __init__(self, target: Path, folder: Path):
        self.target, self.path = target, folder / target.name
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(self.path))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # down(): the listener was shut
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.target))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the relay's thread
        self.listener.close()
        self.path.unlink(missing_ok=True)
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


DB_DOWN_BOUND_S = 2.0  # a diagnosis while the index is unreachable: a 503 within this (connects are refused)


def test_database_outage_keeps_liveness_answers_503_and_loses_no_audit_row(postgres_url, tmp_path, tiny_base,
                                                                           tiny_base_file):
    """Issue 24 item 4, black-box: the registry's PostgreSQL goes away under a serving node with an
    audit trail. /healthz stays under 100 ms at every probe, a diagnosis is a prompt 503, a flood of
    anonymous 401s (each one an audit row) does not block, and once the database is back the node
    answers again without a restart and every buffered row is written with the chain intact."""
    from urllib.parse import parse_qs, urlsplit

    from medlego.runtime.config import AuditConfig
    from medlego.runtime.registry import audit
    from medlego.runtime.registry.index import open_index

    host = parse_qs(urlsplit(postgres_url).query)["host"][0]
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    relay = SocketRelay(next(Path(host).glob(".s.PGSQL.*")), relay_dir)
    relay.up()
    url = postgres_url.replace(f"host={host}", f"host={relay_dir}")
    base = load_base(TINY_MODEL, tiny_base_file)
    reg = Registry(tmp_path / "data", url=url, base=base.spec, max_rank=16, input_size=base.input_size)
    reg.register("hot", random_adapter(tiny_base.spec, tiny_base.preprocess, seed=7).to_bytes())
    log = audit.AuditLog(reg.index, AuditConfig(flush_interval_s=0.05))
    service = DiagnosisService(Engine(base, reg, EngineConfig(slots=8)), auth=Auth(admin_token=ADMIN, api_token=API),
                               audit=log, batching=BatchingConfig(max_batch=8, max_wait_ms=2))
    server = EmbeddedServer(service, host="127.0.0.1", port=0, grpc_port=None).start()
    token = {"Authorization": f"Bearer {API}"}

    def diagnose_hot() -> tuple[int, float]:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/diagnose", files={"file": ("x.png", PNG)}, data={"adapter": "hot"},
                       headers=token, timeout=30)
        return r.status_code, time.perf_counter() - t0

    try:
        assert diagnose_hot()[0] == 200
        with HealthProbe(server.url) as probe:
            relay.down()
            during = [diagnose_hot() for _ in range(5)]
            anonymous = []
            for _ in range(60):
                t0 = time.perf_counter()
                anonymous.append((httpx.get(server.url + "/v1/adapters", timeout=30).status_code,
                                  time.perf_counter() - t0))
            time.sleep(0.5)  # failed flushes retry meanwhile
        probe.assert_fast()
        assert all(status == 503 and seconds < DB_DOWN_BOUND_S for status, seconds in during), during
        assert all(status == 401 and seconds < 1.0 for status, seconds in anonymous), anonymous
        relay.up()
        wait_until(lambda: diagnose_hot()[0] == 200, timeout=30, what="a diagnosis after the database came back")
    finally:
        server.stop()  # flushes the audit buffer
    direct = open_index(postgres_url, tmp_path / "direct")
    flood = [r for r in audit.query(direct, kind="refused") if r.get("action") == "read" and r.get("caller") == ""]
    assert sum(r.get("repeated") or 1 for r in flood) == 60, flood  # one row, then rows counting the repeats
    assert audit.verify(direct).ok
