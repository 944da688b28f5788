"""`medlego serve` as a real process: start, answer over HTTP and gRPC, stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import grpc
import httpx

from medlego.runtime.registry import Registry
from medlego.jobs.synthetic import random_adapter
from medlego.serving import medlego_pb2 as pb
from medlego.serving import medlego_pb2_grpc as pb_grpc
from medlego.jobs.synthetic import encode_png, random_image

from backends import free_port
from conftest import TINY_MODEL
from servers import wait_ready


def test_medlego_serve_process(tmp_path, tiny_base, tiny_base_file):
    data = tmp_path / "reg"
    Registry(data, base=tiny_base.spec).register("cli-a", random_adapter(tiny_base.spec, tiny_base.preprocess, seed=3).to_bytes())
    config = tmp_path / "serve.toml"
    config.write_text('[batching]\nmax_wait_ms = 1\n[limits]\nmax_image_bytes = 100000\n')
    port, gport = free_port(), free_port()
    env = {**os.environ, "MEDLEGO_ADMIN_TOKEN": "cli-admin"}
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "serve", "--model", TINY_MODEL, "--weights", str(tiny_base_file),
                             "--data-dir", str(data), "--port", str(port), "--grpc-port", str(gport), "--config", str(config),
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout=90)
        png = encode_png(random_image(0, 24))
        r = httpx.post(url + "/v1/diagnose", files={"file": ("a.png", png)}, data={"adapter": "cli-a"}, timeout=30)
        assert r.status_code == 200 and r.json()["adapter"] == "cli-a"
        r = httpx.post(url + "/v1/diagnose", files={"file": ("a.png", png + b"\0" * 100_000)}, data={"adapter": "cli-a"},
                       timeout=30)
        assert r.status_code == 413  # the config file's limit is applied
        new = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=4).to_bytes()
        r = httpx.post(url + "/v1/adapters", headers={"Authorization": "Bearer cli-admin"},
                       files={"file": ("b.safetensors", new)}, data={"name": "cli-b"}, timeout=30)
        assert r.status_code == 201
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            assert pb_grpc.MedlegoStub(ch).Diagnose(pb.DiagnoseRequest(adapter="cli-b", image=png), timeout=30).adapter == "cli-b"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "medlego serving" in out


def test_medlego_serve_bad_flags_are_one_line_errors(tmp_path, tiny_base_file):
    r = subprocess.run([sys.executable, "-m", "medlego", "serve", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no base model" in r.stderr and "Traceback" not in r.stderr
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen(1)
        r = subprocess.run([sys.executable, "-m", "medlego", "serve", "--model", TINY_MODEL, "--weights", str(tiny_base_file),
                            "--data-dir", str(tmp_path), "--port", str(port), "--no-grpc"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


# `medlego demo` (its first run, as the README's set-up runs it, and the answers it prints against the
# true labels beside them) is tested by tests/test_readme_blocks.py.
