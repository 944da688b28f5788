"""Issue 24 (items 2, 3, 8, safe defaults): slow and large request bodies cannot stall the HTTP
server, a body is never read before its route's token check, parsing runs off the event loop, and
one role table governs /v1, /v2 and gRPC alike. Real servers on loopback (free ports), no mocks."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import threading
import time

import grpc
import httpx
import pytest

from medlego.runtime.config import Limits, ServerConfig
from medlego.serving import kserve_v2_pb2 as kpb
from medlego.serving import medlego_pb2 as pb
from medlego.serving.auth import ALLOWED, ROUTES, Auth, Caller, digest
from medlego.serving.server import open_on_network
from servers import HealthProbe, seeded_registry, start_server

ADMIN, API, DIAG, READ = "slow-admin", "slow-api", "slow-diagnose", "slow-read"
CALLERS = (Caller("dora", "diagnose", digest(DIAG)), Caller("reid", "read", digest(READ)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_base):
    return seeded_registry(tmp_path_factory.mktemp("slow"), tiny_base, ["s0"], 90, rank=2)


@pytest.fixture(scope="module")
def server(tiny_base_file, data_dir):
    srv = start_server(tiny_base_file, data_dir, grpc=True,
                       auth=Auth(admin_token=ADMIN, api_token=API, callers=CALLERS))
    yield srv
    srv.stop()


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS (Linux >= 4.0)
        f.write("5")


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# -- item 2: slow bodies ---------------------------------------------------------------------------
def _trickler(port: int, path: bytes = b"/v1/merge") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n{")
    return s


def _wait_closed(socks: list[socket.socket], within: float) -> dict[socket.socket, float]:
    """Seconds until the server closed each socket (EOF or reset), reading away whatever it answered."""
    t0, closed, pending = time.monotonic(), {}, list(socks)
    while pending and time.monotonic() - t0 < within:
        readable, _, _ = select.select(pending, [], [], 0.05)
        for s in readable:
            try:
                if s.recv(65536) != b"":
                    continue  # an answer (the 401): the connection itself may stay open
            except OSError:
                pass
            closed[s] = time.monotonic() - t0
            pending.remove(s)
    return closed


def test_trickling_bodies_are_cut_off_and_cannot_lock_out_normal_clients(tiny_base_file, data_dir):
    """More connections than the cap, each in a body that gets one byte every 0.4 s (which restarts the
    stall deadline every time): normal clients get in by evicting the slowest bodies, /healthz stays
    under 100 ms, and every trickling body is cut off once the grace period has passed."""
    grace = 1.0
    srv = start_server(tiny_base_file, data_dir, auth=Auth(admin_token=ADMIN),
                       guard=ServerConfig(max_connections=40, body_grace_s=grace, min_body_rate=1024))
    stop, socks = threading.Event(), []
    try:
        socks = [_trickler(srv.port) for _ in range(40)]  # every slot
        t_start = time.monotonic()

        def trickle():
            while not stop.wait(0.4):
                for s in list(socks):
                    try:
                        s.send(b" ")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        with HealthProbe(srv.url) as probe, httpx.Client(base_url=srv.url, timeout=5) as c:
            for _ in range(5):  # normal requests while every slot was taken: answered, not refused
                t0 = time.perf_counter()
                assert c.get("/v1/adapters/s0", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
                assert time.perf_counter() - t0 < 1.0
            closed = _wait_closed(socks, grace + 4.0)
        probe.assert_fast()
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} trickling bodies still open"
        assert time.monotonic() - t_start < grace + 5.0
        counters = srv.service.engine.counters
        assert counters.get("connections_refused", reason="evicted_body") >= 1  # made room for the normal client
        assert counters.get("connections_refused", reason="body_slow") >= 30
        assert counters.get("connections_refused", reason="cap") == 0
    finally:
        stop.set()
        for s in socks:
            s.close()
        srv.stop()


def test_default_body_bounds_drop_a_trickle_within_15_s():
    cfg = ServerConfig()
    assert cfg.body_grace_s + 1.0 <= 15.0 and cfg.min_body_rate >= 1  # a byte every 7 s is far below any rate


def test_a_fast_large_body_is_not_cut_off(server):
    """The rate floor does not hurt an honest client: a 6 MB JSON body sent at loopback speed is read in full."""
    img = base64.b64encode(os.urandom(6 << 20)).decode()
    r = httpx.post(server.url + "/v1/diagnose", json={"image": img, "adapter": "s0"},
                   headers={"Authorization": f"Bearer {API}"}, timeout=30)
    assert r.status_code == 400 and "image" in r.json()["detail"].lower(), r.text  # read, then refused as no image


# -- item 2: the token check comes before the body -------------------------------------------------
@pytest.mark.parametrize("method,path", [("POST", "/v1/merge"), ("PUT", "/v1/aliases/a"), ("POST", "/v1/diagnose"),
                                         ("POST", "/v1/adapters"), ("POST", "/v2/models/s0/infer")])
def test_no_body_is_read_before_the_token_check(server, method, path):
    """Headers announce 30 MB and no body byte is sent: the 401 comes at once (nothing waits for the body)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        t0 = time.perf_counter()
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {30 << 20}\r\n\r\n".encode())
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 401"), head[:200]
        assert time.perf_counter() - t0 < 1.0
    finally:
        s.close()


def test_an_unauthenticated_30_mb_merge_costs_no_memory(server):
    """The whole 30 MB body is sent (a raw socket, no client-side copies): 401, fast, and the process's
    peak RSS grows by far less than the body: the server discarded it instead of reading and parsing it."""
    body = memoryview(b'{"name": "x", "sources": [' + b'"s0",' * (6 << 20) + b'"s0"]}')
    _peak_rss_reset()
    base = _peak_rss()
    with HealthProbe(server.url) as probe:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/merge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 1 << 20):
            s.sendall(body[i:i + (1 << 20)])
        head = s.recv(4096)
        elapsed = time.perf_counter() - t0
        s.close()
    growth = _peak_rss() - base
    assert head.startswith(b"HTTP/1.1 401"), head[:200]
    assert elapsed < 3.0, elapsed
    assert growth < 16 << 20, f"peak RSS grew {growth >> 20} MB for a body that should not have been read"
    probe.assert_fast()


# -- item 3: parsing off the event loop ------------------------------------------------------------
def _floats(n: int) -> bytes:
    return b",".join([b"0.123456"] * n)


@pytest.mark.parametrize("path,make", [
    ("/v1/merge", lambda: b'{"name": "m", "sources": ["s0"], "params": {"w": [' + _floats(1_500_000) + b"]}}"),
    ("/v2/models/s0/infer", lambda: b'{"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32], '
                                    b'"data": [' + _floats(1_500_000) + b"]}]}"),
    ("/v1/diagnose", lambda: b'{"adapter": "s0", "image": "' + base64.b64encode(os.urandom(12 << 20)) + b'"}'),
])
def test_a_large_json_body_does_not_freeze_healthz(server, path, make):
    """Each body takes the parser hundreds of ms (0.3 s for 1.5 M floats, on the loop before issue 24);
    /healthz, measured concurrently, stays under 100 ms, and the body is answered with a 4xx reason."""
    body = make()
    # json.loads takes the whole body in one C call that holds the interpreter lock (off the event loop, but
    # the loop waits for the lock): 20-40 ms for the 16 MB body on a 2-core Zen 3, where one probe reached
    # 106 ms. The bound allows twice this machine's time for that call; a parse on the loop stalls far longer
    t0 = time.perf_counter()
    json.loads(body)
    parse_ms = 1e3 * (time.perf_counter() - t0)
    with HealthProbe(server.url) as probe:
        r = httpx.post(server.url + path, content=body, timeout=60,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"})
    assert 400 <= r.status_code < 500 and r.status_code not in (401, 403), (r.status_code, r.text[:300])
    probe.assert_fast(slack_ms=2 * parse_ms)


def test_multipart_parts_are_bounded_and_malformed_bodies_are_400(server):
    """The parser's own bounds, as Starlette's were: at most 256 parts, text fields up to 64 KiB, and a
    body cut before its closing boundary is a 400 that says so."""
    auth = {"Authorization": f"Bearer {API}"}
    many = [("task", (None, b"t")) for _ in range(300)] + [("file", ("a.png", b"x"))]
    r = httpx.post(server.url + "/v1/diagnose", files=many, data={"adapter": "s0"}, headers=auth, timeout=60)
    assert r.status_code == 400 and "more than 256 parts" in r.json()["detail"], r.text
    r = httpx.post(server.url + "/v1/diagnose", files={"file": ("a.png", b"x")}, data={"adapter": "s0" * 40_000},
                   headers=auth, timeout=60)
    assert r.status_code == 400 and "above 65536 bytes" in r.json()["detail"], r.text
    body = b'--B\r\nContent-Disposition: form-data; name="adapter"\r\n\r\ns0\r\n--B\r\nContent-Disposition: ' \
        b'form-data; name="file"; filename="a.png"\r\n\r\nxyz'
    r = httpx.post(server.url + "/v1/diagnose", content=body, timeout=60,
                   headers={**auth, "Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and "ends before its closing boundary" in r.json()["detail"], r.text


def test_too_many_json_values_is_413_before_parsing(server):
    limit = Limits().max_json_elements
    body = b'{"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1], "data": [' + \
        b",".join([b"0"] * (limit + 10)) + b"]}]}"
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v2/models/s0/infer", content=body, timeout=30,
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {API}"})
    assert r.status_code == 413 and "limit" in r.json()["error"], r.text
    assert time.perf_counter() - t0 < 2.0
    big_shape = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [64, 3, 1024, 1024],
                             "parameters": {"binary_data_size": 4}}]}
    r = httpx.post(server.url + "/v2/models/s0/infer", json=big_shape, headers={"Authorization": f"Bearer {API}"})
    assert r.status_code == 413 and "elements" in r.json()["error"], r.text


def test_the_audit_answer_is_paged_with_a_lower_limit(server):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.get(server.url + "/v1/audit", params={"limit": 1001}, headers=admin).status_code == 400
    r = httpx.get(server.url + "/v1/audit", params={"limit": 1000, "after": 0}, headers=admin)
    assert r.status_code == 200 and set(r.json()) == {"rows", "next"}, r.text


# -- item 8: one role table -------------------------------------------------------------------------
IDENTITIES = {"admin": ADMIN, "api": API, "diagnose": DIAG, "read": READ, "none": None, "unknown": "not-a-token"}
REST_ROUTES = sorted(r for r in ROUTES if not r.startswith("rpc "))
RPCS = sorted(r for r in ROUTES if r.startswith("rpc "))
_FILL = {"{ref}": "ghost@1", "{alias}": "ghostalias", "{model}": "ghost", "{version}": "1"}


def _expected(route: str, identity: str) -> bool:
    """Whether the table lets this identity use the route."""
    action = ROUTES[route]
    if action is None:
        return True
    return identity in ALLOWED and action in ALLOWED[identity]


def test_every_route_and_rpc_is_in_the_role_table(server):
    """A route or RPC added without an entry in auth.ROUTES fails here."""
    from fastapi.routing import APIRoute
    from starlette.routing import Mount

    found = set()
    for route in server.app.routes:
        if isinstance(route, Mount):
            found |= {f"{m} {route.path}{r.path}" for r in route.routes if isinstance(r, APIRoute)
                      for m in r.methods if m != "HEAD"}
        elif isinstance(route, APIRoute) and not route.path.startswith(("/docs", "/openapi")):
            found |= {f"{m} {route.path}" for m in route.methods}
    assert found == set(REST_ROUTES)
    services = [pb.DESCRIPTOR.services_by_name["Medlego"], kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
    rpcs = {f"rpc {s.full_name}/{m.name}" for s in services for m in s.methods}
    assert rpcs == set(RPCS)


@pytest.mark.parametrize("identity", sorted(IDENTITIES))
@pytest.mark.parametrize("route", REST_ROUTES)
def test_rest_route_follows_the_role_table(server, route, identity):
    method, path = route.split(" ", 1)
    for key, value in _FILL.items():
        path = path.replace(key, value)
    token = IDENTITIES[identity]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.request(method, server.url + path, headers=headers, timeout=30,
                      json={} if method in ("POST", "PUT") else None)
    if _expected(route, identity):
        assert r.status_code not in (401, 403), (route, identity, r.status_code, r.text[:200])
    else:
        assert r.status_code == (401 if token is None else 403), (route, identity, r.status_code, r.text[:200])


@pytest.mark.parametrize("identity", sorted(IDENTITIES))
def test_grpc_calls_follow_the_same_table(server, identity):
    token = IDENTITIES[identity]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(server.grpc_target) as ch:
        for route in RPCS:
            service, method = route[4:].split("/")
            module = kpb if service.startswith("inference.") else pb
            desc = module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods_by_name[method]
            request_cls = getattr(module, desc.input_type.name)
            call = ch.unary_unary(f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=lambda b: b)
            try:
                call(request_cls(), metadata=metadata, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            refused = code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            assert refused != _expected(route, identity), (route, identity, code)


def test_describe_and_v2_metadata_agree_for_every_role(server):
    """Issue 24 item 8: the diagnose role could read /v2 metadata but not /v1 describe; the read role the reverse."""
    for identity in ("diagnose", "read", "api", "admin"):
        h = {"Authorization": f"Bearer {IDENTITIES[identity]}"}
        v1 = httpx.get(server.url + "/v1/adapters/s0", headers=h).status_code
        v2 = httpx.get(server.url + "/v2/models/s0", headers=h).status_code
        assert v1 == v2 == 200, (identity, v1, v2)


# -- safe defaults on a network -------------------------------------------------------------------
def test_an_open_api_on_a_network_address_is_one_warning_line():
    open_auth, tokens = Auth(), Auth(api_token="t")
    for host in ("0.0.0.0", "::", "10.1.2.3", "server.example"):
        line = open_on_network(host, open_auth)
        assert line and "\n" not in line and "MEDLEGO_API_TOKEN" in line and host in line
        assert open_on_network(host, tokens) is None
        assert open_on_network(host, Auth(callers=CALLERS)) is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert open_on_network(host, open_auth) is None


def test_a_loopback_server_without_tokens_does_not_warn(tiny_base_file, data_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="medlego.serving"):
        srv = start_server(tiny_base_file, data_dir)
        srv.stop()
    assert not [r for r in caplog.records if "no diagnosis token" in r.getMessage()]
