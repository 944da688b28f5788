"""Two `medlego serve` processes, each with its own empty data dir and node cache, sharing one
PostgreSQL and one S3 bucket: what is done through one is what the other answers at the next request."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from backends import free_port
from medlego.jobs.synthetic import encode_png, random_adapter, random_image
from servers import wait_ready

ADMIN = "fleet-admin"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
PNG = encode_png(random_image(4, 32))


def _serve(base_file, backend, node: str, tmp_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "medlego", "serve", "--model", "vit_tiny_patch16_224", "--weights", str(base_file),
           "--data-dir", str(tmp_path / node), "--cache-dir", str(tmp_path / node / "cache"),
           "--registry", backend.url, "--store", backend.store, "--port", str(port), "--no-grpc",
           "--log-level", "warning"]
    log = open(tmp_path / f"{node}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MEDLEGO_ADMIN_TOKEN": ADMIN})
    return proc, f"http://127.0.0.1:{port}"


def _diagnose(url: str, ref: str) -> httpx.Response:
    return httpx.post(url + "/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": ref}, timeout=60)


def test_two_servers_share_one_registry(fleet_backend, tiny_base, tiny_base_file, tmp_path):
    (p1, url1), (p2, url2) = (_serve(tiny_base_file, fleet_backend, n, tmp_path) for n in ("node1", "node2"))
    try:
        wait_ready(url1, p1, tmp_path / "node1.log")
        wait_ready(url2, p2, tmp_path / "node2.log")
        a1 = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=41).to_bytes()
        a2 = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=42).to_bytes()

        # registered through server 1: served by server 2 at its next request, same content
        r = httpx.post(url1 + "/v1/adapters", headers=HEADERS, files={"file": ("a.safetensors", a1)},
                       data={"name": "shared"}, timeout=60)
        assert r.status_code == 201, r.text
        sha1 = r.json()["sha256"]
        r = _diagnose(url2, "shared")
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["sha256"]) == (1, sha1)
        assert any(p.name.startswith(sha1) for p in (tmp_path / "node2" / "cache").rglob("*"))  # its own cache

        # a second version through server 2, and an alias on server 2: server 1 follows at once
        r = httpx.post(url2 + "/v1/adapters", headers=HEADERS, files={"file": ("a.safetensors", a2)},
                       data={"name": "shared"}, timeout=60)
        assert r.status_code == 201 and r.json()["version"] == 2
        sha2 = r.json()["sha256"]
        assert httpx.put(url2 + "/v1/aliases/prod", headers=HEADERS, json={"target": "shared@1"}).status_code == 200
        assert _diagnose(url1, "prod").json()["sha256"] == sha1
        assert httpx.put(url2 + "/v1/aliases/prod", headers=HEADERS, json={"target": "shared@2"}).status_code == 200
        answer = _diagnose(url1, "prod").json()
        assert (answer["version"], answer["sha256"]) == (2, sha2)

        # pinned on server 1: refused on server 2; deleted on server 1: 404 on server 2
        assert httpx.post(url1 + "/v1/adapters/shared@1/pin", headers=HEADERS).status_code == 200
        r = httpx.delete(url2 + "/v1/adapters/shared@1", headers=HEADERS)
        assert r.status_code == 409 and "pinned" in r.json()["detail"]
        assert httpx.post(url2 + "/v1/adapters/shared@1/unpin", headers=HEADERS).status_code == 200
        r = httpx.delete(url1 + "/v1/adapters/shared@1", headers=HEADERS)
        assert r.status_code == 200 and r.json()["deleted"] == ["shared@1"]
        r = _diagnose(url2, "shared@1")
        assert r.status_code == 404 and "shared@1" in r.json()["detail"]
        assert _diagnose(url2, "shared").json()["sha256"] == sha2
        assert not fleet_backend.holds(sha1)  # the last reference went: so did the object
    finally:
        for p in (p1, p2):
            p.terminate()
        for p in (p1, p2):
            p.wait(30)
