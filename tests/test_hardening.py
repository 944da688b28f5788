"""Hostile and unlucky input against a real server on loopback: no 500, no INTERNAL, no Nagle stall,
no slowloris, no pins that starve the pool, no NaN answers, nothing left behind by a refusal."""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import statistics
import struct
import time
from dataclasses import replace

import grpc
import httpx
import pytest
import torch

from medlego.jobs.synthetic import encode_png, random_adapter, random_image
from medlego.runtime.adapter import Head
from medlego.runtime.config import EngineConfig, ServerConfig, load_config
from medlego.runtime.errors import BadInputError
from medlego.runtime.registry import Registry
from medlego.serving import medlego_pb2 as pb
from medlego.serving import medlego_pb2_grpc as pb_grpc
from medlego.serving.auth import Auth
from servers import seeded_registry, start_server

ADMIN = "hardening-admin"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_base):
    return seeded_registry(tmp_path_factory.mktemp("hardening"), tiny_base, [f"h{i}" for i in range(5)], 70, rank=2)


@pytest.fixture(scope="module")
def server(tiny_base_file, data_dir):
    srv = start_server(tiny_base_file, data_dir, auth=Auth(admin_token=ADMIN), grpc=True,
                       engine=EngineConfig(slots=4, unpinned_slots=2))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield pb_grpc.MedlegoStub(ch)


PNG = encode_png(random_image(3, 32))


def _status(r, expected: int, pattern: str = ""):
    assert r.status_code == expected, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert "\n" not in detail and pattern.lower() in detail.lower(), detail


# -- the transport ----------------------------------------------------------------------------------
def test_keep_alive_responses_are_not_held_back_by_nagle(server):
    """Three and more requests on one keep-alive connection: each well under the 40 ms of a delayed ACK."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"alive": True}
        times.append(time.perf_counter() - t0)
    conn.close()
    assert statistics.median(times[1:]) < 0.010, [round(t * 1000, 1) for t in times]


def _slow_sockets(port: int, n: int, partial: bool) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if partial:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(s)
    return socks


def _closed_by_server(socks: list[socket.socket], within: float) -> int:
    """How many of the sockets the server closed (EOF or reset) within `within` seconds."""
    deadline, closed, pending = time.monotonic() + within, 0, list(socks)
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
        for s in readable:
            pending.remove(s)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
    return closed


def test_slow_clients_are_cut_off_and_normal_clients_still_served(tiny_base_file, data_dir):
    srv = start_server(tiny_base_file, data_dir, guard=ServerConfig(header_timeout_s=1.5, max_connections=60))
    try:
        # more slow clients than the cap: each new one takes the place of the oldest header-less one
        slow = _slow_sockets(srv.port, 50, partial=True) + _slow_sockets(srv.port, 50, partial=False)
        assert _closed_by_server(slow[:40], 0.3) == 40
        with httpx.Client(base_url=srv.url, timeout=10) as c:  # normal clients are served meanwhile
            t0 = time.perf_counter()
            for _ in range(5):
                assert c.get("/healthz").status_code == 200
            assert time.perf_counter() - t0 < 1.0
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=5)  # a body that stops arriving
        stalled.sendall(b"POST /v1/diagnose HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100000\r\n\r\n{\"image\": \"")
        assert _closed_by_server(slow[40:], 3.0) == 60  # the header deadline closes every other slow one
        assert _closed_by_server([stalled], 3.0) == 1
        slow.append(stalled)
        counters = srv.service.engine.counters
        assert counters.get("connections_refused", reason="evicted_idle") >= 40
        assert counters.get("connections_refused", reason="header_timeout") >= 55
        assert counters.get("connections_refused", reason="body_timeout") == 1
        for s in slow:
            s.close()
    finally:
        srv.stop()


def test_repeated_loop_errors_are_logged_once_per_period(caplog):
    import asyncio

    from medlego.serving.http_guard import quiet_exception_handler

    loop = asyncio.new_event_loop()
    try:
        quiet_exception_handler(loop)
        with caplog.at_level(logging.ERROR, logger="medlego.serving"):
            for _ in range(5000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
        assert len([r for r in caplog.records if "accept" in r.getMessage()]) == 1
    finally:
        loop.close()


# -- no 500 for a user's mistake --------------------------------------------------------------------
@pytest.mark.parametrize("body, pattern", [
    (b'{"image": "aGk=", "adapter": "h0", "top_k": 1e400}', "top_k"),
    (b'{"image": "aGk=", "adapter": "h0", "top_k": Infinity}', "Infinity"),
    (b'{"image": "aGk=", "adapter": "h0", "top_k": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"image": "aGk=", "adapter": "h0", "top_k": true}', "top_k"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b'{"image": "aGk=", "adapter": "\\ud800"}', "UTF-8"),
    (b'{"image": "aGk=", "adapter": "h0", "task": "\\udfff"}', "UTF-8"),
    (b'{"image": "aGk=", "adapter": ["h0"]}', "string"),
])
def test_hostile_json_bodies_are_400(client, body, pattern):
    _status(client.post("/v1/diagnose", content=body, headers={"Content-Type": "application/json"}), 400, pattern)


@pytest.mark.parametrize("ref", ["h0@99999999999999999999", "h0@²", "h0@-1", "h0@", "evil\n", "h0\x00", "x" * 300])
def test_malformed_references_are_4xx_on_rest_and_grpc(client, stub, ref):
    r = client.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": ref})
    assert r.status_code in (400, 404), (r.status_code, r.text)
    with pytest.raises(grpc.RpcError) as e:
        stub.Diagnose(pb.DiagnoseRequest(adapter=ref, image=PNG), timeout=30)
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.value.details()


@pytest.mark.parametrize("params, pattern", [
    ({"drop": 1.0}, "'drop' must be in [0, 1)"),
    ({"drop": -0.1}, "'drop'"),
    ({"seed": 1.5}, "'seed' must be an integer"),
])
def test_merge_parameters_out_of_range_are_400(client, params, pattern):
    body = {"name": "m", "sources": ["h0", "h1"], "method": "dare", "params": params}
    _status(client.post("/v1/merge", headers=HEADERS, json=body), 400, pattern)


def test_ties_density_out_of_range_is_400(client):
    body = {"name": "m", "sources": ["h0", "h1"], "method": "ties", "params": {"density": -1}}
    _status(client.post("/v1/merge", headers=HEADERS, json=body), 400, "'density' must be in (0, 1]")


def _deeply_nested_upload(tiny_base) -> bytes:
    """A valid adapter whose provenance metadata is JSON nested 100,000 deep."""
    good = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=5).to_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    header["__metadata__"]["provenance"] = "[" * 100_000 + "]" * 100_000
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]


def test_uploads_with_deeply_nested_metadata_are_422_and_write_nothing(client, data_dir, tiny_base):
    before = sorted(p.name for p in (data_dir / "store").iterdir())
    r = client.post("/v1/adapters", headers=HEADERS, files={"file": ("x.safetensors", _deeply_nested_upload(tiny_base))},
                    data={"name": "deep"})
    _status(r, 422, "nested too deeply")
    assert sorted(p.name for p in (data_dir / "store").iterdir()) == before


def test_names_must_not_end_in_a_newline(client, tiny_base):
    data = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=6).to_bytes()
    r = client.post("/v1/adapters", headers=HEADERS, files={"file": ("x.safetensors", data)}, data={"name": "evil\n"})
    _status(r, 400, "name")
    r = client.put("/v1/aliases/evil%0A", headers=HEADERS, json={"target": "h0@1"})
    assert r.status_code == 400, r.text


def test_a_refused_upload_leaves_nothing_and_moving_an_alias_needs_the_flag(client, data_dir, tiny_base):
    assert client.put("/v1/aliases/stable", headers=HEADERS, json={"target": "h0@1"}).status_code == 200
    before = sorted(p.name for p in (data_dir / "store").iterdir())
    data = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=7).to_bytes()
    r = client.post("/v1/adapters", headers=HEADERS, files={"file": ("x.safetensors", data)},
                    data={"name": "newer", "alias": "stable"})
    _status(r, 409, "stable")
    assert sorted(p.name for p in (data_dir / "store").iterdir()) == before  # nothing left behind
    assert client.get("/v1/aliases").json()["stable"] == "h0@1"
    r = client.post("/v1/adapters", headers=HEADERS, files={"file": ("x.safetensors", data)},
                    data={"name": "newer", "alias": "stable", "move_alias": "true"})
    assert r.status_code == 201, r.text
    assert client.get("/v1/aliases").json()["stable"] == "newer@1"


def test_provenance_only_in_describe_and_capped_at_registration(client, tiny_base):
    listing = client.get("/v1/adapters").json()["adapters"]
    assert listing and all("provenance" not in a for a in listing)
    assert "provenance" in client.get("/v1/adapters/h0").json()
    fat = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=8, provenance={"notes": "x" * 200_000}).to_bytes()
    r = client.post("/v1/adapters", headers=HEADERS, files={"file": ("x.safetensors", fat)}, data={"name": "fat"})
    _status(r, 422, "provenance")


# -- slots and numerics -----------------------------------------------------------------------------
def test_pins_cannot_starve_the_pool(client, stub, server, data_dir):
    """4 slots, 2 kept unpinned: the third pin is 409; pins made elsewhere that fill the slots give 503."""
    try:
        assert client.post("/v1/adapters/h0@1/pin", headers=HEADERS).status_code == 200
        assert client.post("/v1/adapters/h1@1/pin", headers=HEADERS).status_code == 200
        _status(client.post("/v1/adapters/h2@1/pin", headers=HEADERS), 409, "at most 2 of the 4")
        for ref in ("h0", "h1", "h2"):
            r = client.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": ref})
            assert r.status_code == 200, r.text
        reg = Registry(data_dir)
        reg.pin("h2@1")
        reg.pin("h3@1")  # another server of the fleet pinned these: all 4 slots pinned
        for ref in ("h2", "h3"):  # pinned adapters are served, and the pool learns the pins from each resolve
            r = client.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": ref})
            assert r.status_code == 200, r.text
        r = client.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "h4"})
        _status(r, 503, "pinned by other adapters")
        assert r.headers["Retry-After"] == "1"
        with pytest.raises(grpc.RpcError) as e:
            stub.Diagnose(pb.DiagnoseRequest(adapter="h4", image=PNG), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        reg = Registry(data_dir)
        for ref in ("h0@1", "h1@1", "h2@1", "h3@1"):
            reg.unpin(ref)
            client.post(f"/v1/adapters/{ref}/unpin", headers=HEADERS)


def _huge_head(tiny_base, seed: int):
    ad = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=seed)
    name = ad.tasks[0].name
    return replace(ad, heads={name: Head(torch.full_like(ad.heads[name].weight, 3e38), ad.heads[name].bias)})


def test_an_adapter_that_overflows_is_refused_and_never_answers_nan(client, stub, data_dir, tiny_base):
    huge = _huge_head(tiny_base, 9).to_bytes()
    r = client.post("/v1/adapters", headers=HEADERS, files={"file": ("x.safetensors", huge)}, data={"name": "huge"})
    _status(r, 422, "overflow")
    Registry(data_dir).register("sneaky", huge)  # written behind the server's back (an older server, say)
    r = client.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "sneaky"})
    _status(r, 422, "non-finite")
    with pytest.raises(grpc.RpcError) as e:
        stub.Diagnose(pb.DiagnoseRequest(adapter="sneaky", image=PNG), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in e.value.details()


# -- configuration ----------------------------------------------------------------------------------
def test_tokens_are_trimmed_and_an_empty_one_is_refused(tmp_path):
    cfg = load_config(env={"MEDLEGO_ADMIN_TOKEN": "  secret\n"})
    assert cfg.auth.admin_token == "secret"
    toml = tmp_path / "s.toml"
    toml.write_text('[auth]\nadmin_token = "from-file"\n')
    with pytest.raises(BadInputError, match=r"\$MEDLEGO_ADMIN_TOKEN is empty"):
        load_config(toml, env={"MEDLEGO_ADMIN_TOKEN": "   "})  # set but empty: refused, never silently ignored
    assert load_config(toml, env={}).auth.admin_token == "from-file"
    secret = tmp_path / "api"
    secret.write_text("\n")
    toml.write_text(f'[auth]\napi_token_file = "{secret}"\n')
    with pytest.raises(BadInputError, match="api_token_file.* is empty"):
        load_config(toml, env={})


# -- memory per request, measured on a real server process -------------------------------------------
def _peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_hostile_images_cost_a_server_bounded_memory(tmp_path, tiny_base, tiny_base_file):
    """Bombs and huge images inside the byte limit, sent to `medlego serve`: each refused or reduced, and the
    server's peak RSS grows by no more than ~4x the decoded model input + 64 MB over all of them."""
    import subprocess
    import sys

    import test_imaging_limits as cases
    from backends import free_port
    from servers import wait_ready

    data = seeded_registry(tmp_path / "data", tiny_base, ["m0"], 30)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "serve", "--model", "vit_tiny_patch16_224",
                             "--weights", str(tiny_base_file), "--data-dir", str(data), "--port", str(port),
                             "--no-grpc", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=120)
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(3):  # warm every path a request takes (threads, arenas, the batch)
                assert c.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "m0"}).status_code == 200
            baseline = _peak_rss(proc.pid)
            outcomes = {}
            for name, make, options, expected, _ in cases.MEMORY_CASES:
                if options:  # cases that raise the pixel limit above the server's
                    continue
                r = c.post("/v1/diagnose", files={"file": ("x", make())}, data={"adapter": "m0"})
                outcomes[name] = r.status_code
                if isinstance(expected, str):  # the server's side limit may refuse first: same size, its own words
                    _status(r, 400, expected.split(",")[0])
                else:
                    assert r.status_code == 200, (name, r.text)
            growth = _peak_rss(proc.pid) - baseline
        print(f"\nserver peak RSS growth over {len(outcomes)} hostile images: {growth / 2**20:.1f} MB "
              f"(budget {cases.MEMORY_BUDGET / 2**20:.1f} MB): {outcomes}")
        assert growth <= cases.MEMORY_BUDGET, (f"{growth / 2**20:.0f} MB", outcomes)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
