"""The REST API over a real socket: answers equal the engine's, hot registration, admin API, errors, metrics."""

from __future__ import annotations

import base64
import hashlib
import concurrent.futures as cf
import re
import threading
import time

import httpx
import numpy as np
import pytest
import torch

import servers
from conftest import TINY_MODEL
from medlego.jobs.synthetic import encode_dicom, encode_jpeg, encode_png, random_adapter, random_image
from medlego.runtime.adapter import TaskSpec
from medlego.runtime.base import load_base
from medlego.runtime.config import AuditConfig, BatchingConfig, EngineConfig, Limits
from medlego.runtime.engine import Engine
from medlego.runtime.imaging import decode_image, preprocess
from medlego.runtime.registry import Registry
from medlego.runtime.registry.audit import AuditLog
from medlego.serving.auth import Auth
from medlego.serving.server import EmbeddedServer
from waiting import wait_until

ADMIN = "admin-secret-token"
TWO_TASKS = [TaskSpec("blood", tuple(f"b{i}" for i in range(8))),
             TaskSpec("chest", tuple(f"c{i}" for i in range(5)), multilabel=True)]


def start_server(base_file, data_dir, *, auth=Auth(admin_token=ADMIN), limits=None, batching=None,
                 grpc=False) -> EmbeddedServer:
    return servers.start_server(base_file, data_dir, auth=auth, limits=limits, batching=batching, grpc=grpc)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("serving")
    reg = Registry(d, base=tiny_base.spec)
    for i, (rank, tasks) in enumerate([(2, None), (4, None), (8, TWO_TASKS), (3, None)]):
        reg.register(f"ad{i}", random_adapter(tiny_base.spec, tiny_base.preprocess, rank=rank, tasks=tasks,
                                              seed=10 + i).to_bytes())
    return d


@pytest.fixture(scope="module")
def server(tiny_base_file, data_dir):
    srv = start_server(tiny_base_file, data_dir)
    yield srv
    srv.stop()


def admin_headers(token=ADMIN):
    return {"Authorization": f"Bearer {token}"}


def images():
    """PNG (RGB and grey), JPEG and DICOM, of different sizes: decoded and resized by the server."""
    return [
        encode_png(random_image(1, 40)),
        encode_png(random_image(2, 32, rgb=False)),
        encode_jpeg(random_image(3, 64)),
        encode_dicom(random_image(4, 36, rgb=False).astype(np.float32) / 255.0),
        encode_png(random_image(5, 20)),
        encode_jpeg(random_image(6, 33, rgb=False)),
    ]


def engine_answers(base_file, data_dir, cases):
    """The engine's own answers for (image bytes, adapter, task), in-process, no server."""
    base = load_base(TINY_MODEL, base_file)
    reg = Registry(data_dir, base=base.spec)
    engine = Engine(base, reg, EngineConfig(slots=8))
    pixels, refs, tasks = [], [], []
    for data, ref, task in cases:
        pp = engine.resolve(ref).preprocess
        pixels.append(preprocess(decode_image(data), pp))
        refs.append(ref)
        tasks.append(task)
    return engine.infer(torch.stack(pixels), refs, tasks)


def test_concurrent_mixed_adapters_match_engine(server, tiny_base_file, data_dir):
    imgs = images()
    cases = []
    for n in range(18):
        ref = f"ad{n % 4}"
        task = ("blood", "chest")[(n // 4) % 2] if ref == "ad2" else None
        cases.append((imgs[n % len(imgs)], ref, task))

    def send(case):
        data, ref, task = case
        with httpx.Client(base_url=server.url, timeout=60) as c:
            fields = {"adapter": ref, "top_k": "3"} | ({"task": task} if task else {})
            return c.post("/v1/diagnose", files={"file": ("scan.bin", data)}, data=fields)

    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, cases))
    expected = engine_answers(tiny_base_file, data_dir, cases)
    reg = Registry(data_dir)
    for r, exp, (_, ref, task) in zip(responses, expected, cases):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == ref and body["version"] == 1 and body["sha256"] == reg.resolve(ref).sha256
        assert body["task"] == exp.task
        assert set(body["probabilities"]) == set(exp.probabilities)
        for label, p in exp.probabilities.items():
            assert body["probabilities"][label] == pytest.approx(p, abs=1e-5)
        assert len(body["top"]) == 3 and body["top"][0]["probability"] == max(body["probabilities"].values())
        assert {"decode", "queue", "inference", "total"} <= set(body["timings_ms"])
    assert responses[2].json()["multilabel"] is False and responses[6].json()["multilabel"] is True
    chest = [r.json() for r, c in zip(responses, cases) if c[2] == "chest"]
    assert chest and all(b["multilabel"] for b in chest)


def test_json_and_batch_forms_match_single(client):
    imgs = images()
    single = client.post("/v1/diagnose", files={"file": ("a.png", imgs[0])}, data={"adapter": "ad1"}).json()
    as_json = client.post("/v1/diagnose", json={"adapter": "ad1", "image": base64.b64encode(imgs[0]).decode()})
    assert as_json.status_code == 200
    assert as_json.json()["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)
    batch = client.post("/v1/diagnose/batch", json={
        "adapter": "ad1", "items": [{"image": base64.b64encode(imgs[0]).decode()},
                                    {"image": base64.b64encode(imgs[2]).decode(), "adapter": "ad2", "task": "chest"}]})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["adapter"] for r in results] == ["ad1", "ad2"] and results[1]["task"] == "chest"
    assert results[0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)
    multi = client.post("/v1/diagnose/batch", files=[("file", ("a.png", imgs[0])), ("file", ("b.jpg", imgs[2]))],
                        data={"adapter": ["ad1", "ad3"]})
    assert multi.status_code == 200, multi.text
    assert [r["adapter"] for r in multi.json()["results"]] == ["ad1", "ad3"]
    assert multi.json()["results"][0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_register_while_requests_flow(server, client, tiny_base):
    img = images()[0]
    stop = threading.Event()
    statuses = []

    def traffic():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post("/v1/diagnose", files={"file": ("a.png", img)}, data={"adapter": "ad0"}).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: len(statuses) >= 3, what="traffic flowing before the registration")
        new = random_adapter(tiny_base.spec, tiny_base.preprocess, rank=5, seed=77)
        r = client.post("/v1/adapters", headers=admin_headers(), files={"file": ("new.safetensors", new.to_bytes())},
                        data={"name": "hot", "alias": "hot-latest"})
        assert r.status_code == 201, r.text
        assert r.json()["ref"] == "hot@1" and "hot-latest" in r.json()["aliases"]
        for ref in ("hot", "hot@1", "hot-latest"):  # usable at once, by every kind of reference
            d = client.post("/v1/diagnose", files={"file": ("a.png", img)}, data={"adapter": ref})
            assert d.status_code == 200, d.text
            assert d.json()["adapter"] == "hot" and d.json()["sha256"] == r.json()["sha256"]
        seen = len(statuses)
        wait_until(lambda: len(statuses) >= seen + 3, what="traffic still flowing after the registration")
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert len(statuses) > 5 and set(statuses) == {200}
    listing = client.get("/v1/adapters").json()
    assert "hot@1" in [a["ref"] for a in listing["adapters"]] and listing["aliases"]["hot-latest"] == "hot@1"


def test_register_refuses_invalid_uploads_and_writes_nothing(client, data_dir, tiny_base, other_base_file):
    before = sorted(p.name for p in (data_dir / "store").iterdir())
    other = load_base(TINY_MODEL, other_base_file)
    wrong_base = random_adapter(other.spec, other.preprocess, seed=3).to_bytes()
    r = client.post("/v1/adapters", headers=admin_headers(), files={"file": ("x.safetensors", wrong_base)},
                    data={"name": "wrong"})
    _err(r, 422, r"made for base .*fingerprint.*resident base")
    r = client.post("/v1/adapters", headers=admin_headers(), files={"file": ("x.safetensors", b"\x00" * 64)},
                    data={"name": "junk"})
    _err(r, 422, r"not a safetensors file")
    pickle_like = b"\x80\x04\x95" + b"x" * 100  # a pickle is refused as not-safetensors, never loaded
    r = client.post("/v1/adapters", headers=admin_headers(), files={"file": ("x.pt", pickle_like)}, data={"name": "pkl"})
    _err(r, 422, r"not a safetensors file")
    ok = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=5).to_bytes()
    r = client.post("/v1/adapters", headers=admin_headers(), files={"file": ("x.safetensors", ok)}, data={"name": "bad name!"})
    assert r.status_code == 400 and "name" in r.json()["detail"]
    r = client.post("/v1/adapters", headers=admin_headers(), data={"name": "nofile"},
                    files={"other": ("x", b"1")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    assert sorted(p.name for p in (data_dir / "store").iterdir()) == before
    names = {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}
    assert not names & {"wrong", "junk", "pkl", "nofile"}


def test_delete_refused_while_pinned(server, client, tiny_base):
    img = images()[1]
    data = random_adapter(tiny_base.spec, tiny_base.preprocess, rank=2, seed=91).to_bytes()
    assert client.post("/v1/adapters", headers=admin_headers(), files={"file": ("d.safetensors", data)},
                       data={"name": "doomed"}).status_code == 201
    assert client.post("/v1/diagnose", files={"file": ("a.png", img)}, data={"adapter": "doomed"}).status_code == 200
    r = client.post("/v1/adapters/doomed@1/pin", headers=admin_headers())
    assert r.status_code == 200 and r.json()["pinned"] is True
    r = client.delete("/v1/adapters/doomed@1", headers=admin_headers())
    assert r.status_code == 409 and "pinned" in r.json()["detail"]
    assert client.post("/v1/diagnose", files={"file": ("a.png", img)}, data={"adapter": "doomed"}).status_code == 200
    pool = server.service.engine.pool
    assert pool.stats()["pinned"] == 1  # pinned on the device too, not only in the registry
    assert client.post("/v1/adapters/doomed@1/unpin", headers=admin_headers()).json()["pinned"] is False
    assert client.post("/v1/diagnose", files={"file": ("a.png", img)}, data={"adapter": "doomed"}).status_code == 200
    assert pool.stats()["pinned"] == 0
    r = client.delete("/v1/adapters/doomed", headers=admin_headers())
    assert r.status_code == 400 and "doomed@N" in r.json()["detail"]  # a bare name needs all_versions
    r = client.delete("/v1/adapters/doomed@1", headers=admin_headers())
    assert r.status_code == 200 and r.json()["deleted"] == ["doomed@1"]
    r = client.post("/v1/diagnose", files={"file": ("a.png", img)}, data={"adapter": "doomed"})
    # names the missing thing, and never lists the registry to the caller
    assert r.status_code == 404 and "unknown adapter 'doomed'" in r.json()["detail"] and "ad0" not in r.json()["detail"]
    assert client.delete("/v1/adapters/doomed@1", headers=admin_headers()).status_code == 404


def test_alias_endpoints(client):
    r = client.put("/v1/aliases/current", headers=admin_headers(), json={"target": "ad3@1"})
    assert r.status_code == 200 and r.json()["resolves_to"] == "ad3@1"
    d = client.post("/v1/diagnose", files={"file": ("a.png", images()[0])}, data={"adapter": "current"})
    assert d.status_code == 200 and d.json()["adapter"] == "ad3"
    assert client.get("/v1/aliases").json()["current"] == "ad3@1"
    assert client.delete("/v1/aliases/current", headers=admin_headers()).status_code == 200
    assert client.get("/v1/adapters/current").status_code == 404
    desc = client.get("/v1/adapters/ad2").json()
    assert [t["name"] for t in desc["tasks"]] == ["blood", "chest"] and desc["versions"] == [1]


def test_merge_endpoint_registers_a_usable_merged_adapter(client):
    body = {"name": "merged01", "sources": ["ad0", "ad1@1"], "method": "med-lego", "params": {"threshold": 0.99}}
    assert client.post("/v1/merge", json=body).status_code == 401
    r = client.post("/v1/merge", headers=admin_headers(), json=body)
    assert r.status_code == 201, r.text
    desc = r.json()
    assert desc["ref"] == "merged01@1" and [t["name"] for t in desc["tasks"]] == ["task10", "task11"]
    assert desc["provenance"]["method"] == "med-lego" and desc["provenance"]["parameters"]["threshold"] == 0.99
    assert [s["ref"] for s in desc["provenance"]["sources"]] == ["ad0", "ad1@1"]
    d = client.post("/v1/diagnose", files={"file": ("a.png", images()[0])}, data={"adapter": "merged01", "task": "task11"})
    assert d.status_code == 200 and d.json()["task"] == "task11" and d.json()["sha256"] == desc["sha256"]
    _err(client.post("/v1/merge", headers=admin_headers(), json={**body, "name": "m2", "sources": ["ad0", "ghost"]}),
         404, r"unknown adapter 'ghost'")
    _err(client.post("/v1/merge", headers=admin_headers(), json={**body, "name": "m3", "method": "blend"}),
         400, r"unknown merge method 'blend'")
    _err(client.post("/v1/merge", headers=admin_headers(), json={**body, "name": "m4", "params": {"threshold": "high"}}),
         400, r"bad parameters")


def _err(r, status, pattern):
    assert r.status_code == status, (r.status_code, r.text)
    assert re.search(pattern, r.json()["detail"]), r.json()["detail"]
    return r


def test_every_error_has_its_status_and_message(client):
    png = images()[0]
    post = lambda **kw: client.post("/v1/diagnose", **kw)  # noqa: E731
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad"}), 404, r"unknown adapter 'ad'; did you mean ad0, ad1, ad2")
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad2"}), 404, r"name one of: blood, chest")
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad0", "task": "lung"}), 404, r"unknown task 'lung'")
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad0@9"}), 404, r"unknown adapter 'ad0@9'")
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad0@x"}), 400, r"version")
    _err(post(files={"file": ("a.png", b"GIF89a" + b"\0" * 50)}, data={"adapter": "ad0"}), 400, r"PNG, JPEG or DICOM")
    _err(post(files={"file": ("a.png", png[:60])}, data={"adapter": "ad0"}), 400, r"cannot decode PNG")
    _err(post(files={"file": ("a.png", b"")}, data={"adapter": "ad0"}), 400, r"empty image")
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad0", "top_k": "0"}), 400, r"top_k")
    _err(post(files={"file": ("a.png", png)}, data={"adapter": "ad0", "top_k": "many"}), 400, r"top_k")
    _err(post(files={"file": ("a.png", png)}), 400, r"'adapter' is required")
    _err(post(data={"adapter": "ad0"}, files={"other": ("x", b"1")}), 400, r"'file'")
    _err(post(content=b"{not json", headers={"content-type": "application/json"}), 400, r"not valid JSON")
    _err(post(json={"adapter": "ad0", "image": "%%%notbase64"}), 400, r"not valid base64")
    _err(post(json={"adapter": "ad0"}), 400, r"'image'")
    _err(post(content=b"abc", headers={"content-type": "text/plain"}), 400, r"unsupported content type")
    _err(client.post("/v1/diagnose/batch", json={"items": []}), 400, r"at least one image")
    _err(client.post("/v1/diagnose/batch", json={"items": [{"image": base64.b64encode(png).decode(), "adapter": "ad0"},
                                                           {"image": "AAAA", "adapter": "ad0"}]}), 400, r"image 1:")
    _err(client.post("/v1/adapters", files={"file": ("x", b"1")}, data={"name": "x"}), 401, r"Bearer")
    assert client.post("/v1/adapters", files={"file": ("x", b"1")}, data={"name": "x"}).headers["www-authenticate"] == "Bearer"
    _err(client.post("/v1/adapters", headers=admin_headers("wrong"), files={"file": ("x", b"1")}, data={"name": "x"}),
         403, r"wrong admin token")
    _err(client.delete("/v1/adapters/ad0@1"), 401, r"Bearer")
    _err(client.post("/v1/adapters/ad0@1/pin", headers=admin_headers("nah")), 403, r"wrong admin token")
    _err(client.get("/v1/adapters/missing"), 404, r"unknown adapter 'missing'")


def test_limits_give_413_and_400(tiny_base_file, data_dir, tiny_base):
    limits = Limits(max_body_bytes=20_000, max_image_bytes=10_000, max_image_side=100, max_batch_images=2,
                    max_adapter_bytes=50_000)
    srv = start_server(tiny_base_file, data_dir, limits=limits)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            big = encode_png(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8))  # > 20 kB noise
            _err(c.post("/v1/diagnose", files={"file": ("a.png", big)}, data={"adapter": "ad0"}), 413, r"limit")
            mid = encode_png(np.random.default_rng(1).integers(0, 255, (70, 70, 3), dtype=np.uint8))  # 10-20 kB
            assert 10_000 < len(mid) < 19_000
            _err(c.post("/v1/diagnose", files={"file": ("a.png", mid)}, data={"adapter": "ad0"}), 413, r"image")
            wide = encode_png(np.zeros((2, 150), dtype=np.uint8))  # tiny file, too wide
            _err(c.post("/v1/diagnose", files={"file": ("a.png", wide)}, data={"adapter": "ad0"}), 400, r"150x2.*100")

            def chunked():
                yield b"x" * 15_000
                yield b"y" * 15_000

            _err(c.post("/v1/diagnose", content=chunked(), headers={"content-type": "application/json"}), 413, r"limit")
            small = base64.b64encode(encode_png(random_image(0, 16))).decode()
            _err(c.post("/v1/diagnose/batch", json={"adapter": "ad0", "items": [{"image": small}] * 3}), 413, r"limit is 2")
            ok = c.post("/v1/diagnose", files={"file": ("a.png", encode_png(random_image(0, 16)))}, data={"adapter": "ad0"})
            assert ok.status_code == 200
            adapter = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=4).to_bytes()  # ~150 kB
            _err(c.post("/v1/adapters", headers=admin_headers(), files={"file": ("a.safetensors", adapter)},
                        data={"name": "big"}), 413, r"adapter upload is above the limit of 50000")
    finally:
        srv.stop()


def test_overloaded_answers_503_with_retry_after(tiny_base_file, data_dir):
    srv = start_server(tiny_base_file, data_dir, batching=BatchingConfig(max_batch=1, max_wait_ms=0, max_queue=1))
    srv.service.audit = AuditLog(srv.service.registry.index, AuditConfig())
    engine = srv.service.engine
    gate = threading.Event()
    original = engine.run

    def held_run(reqs):  # hold the worker so the queue fills (the queue and admission are real)
        gate.wait(20)
        return original(reqs)

    engine.run = held_run
    try:
        png = encode_png(random_image(0, 16))

        def send(_):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                return c.post("/v1/diagnose", files={"file": ("a.png", png)}, data={"adapter": "ad0"})

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, i) for i in range(8)]
            wait_until(lambda: sum(f.done() for f in futures) >= 5, timeout=20, what="five answers")
            gate.set()
            rs = [f.result() for f in futures]
        codes = sorted(r.status_code for r in rs)
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        over = [r for r in rs if r.status_code == 503][0]
        assert over.headers["retry-after"] == "1" and "overloaded" in over.json()["detail"]
        # each refusal is audited under its own request id, with the image's digest (hashed off the event loop)
        rows = {row["request_id"]: row for row in srv.service.recorder.query(srv.service.registry.index, kind="refused")}
        for r in rs:
            if r.status_code == 503:
                row = rows[r.headers["x-request-id"]]
                assert row["outcome"] == "overloaded" and row["image_sha256"] == hashlib.sha256(png).hexdigest(), row
        # the worker survived: the server still answers
        assert send(0).status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_admin_api_closed_without_token_and_api_token_enforced(tiny_base_file, data_dir, tiny_base):
    srv = start_server(tiny_base_file, data_dir, auth=Auth(admin_token=None, api_token="diag-token"))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            ok = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=8).to_bytes()
            for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "Bearer diag-token"}):
                r = c.post("/v1/adapters", headers=headers, files={"file": ("x.safetensors", ok)}, data={"name": "x"})
                _err(r, 403, r"admin API is closed.*MEDLEGO_ADMIN_TOKEN")
            _err(c.delete("/v1/adapters/ad0@1"), 403, r"closed")
            png = encode_png(random_image(0, 16))
            _err(c.post("/v1/diagnose", files={"file": ("a.png", png)}, data={"adapter": "ad0"}), 401, r"API token")
            _err(c.post("/v1/diagnose", headers={"Authorization": "Bearer nope"}, files={"file": ("a.png", png)},
                        data={"adapter": "ad0"}), 403, r"wrong API token")
            _err(c.get("/v1/adapters"), 401, r"API token")
            r = c.post("/v1/diagnose", headers={"Authorization": "Bearer diag-token"}, files={"file": ("a.png", png)},
                       data={"adapter": "ad0"})
            assert r.status_code == 200
            assert c.get("/healthz").status_code == 200
            # /metrics lists adapter names: it follows the API token
            _err(c.get("/metrics"), 401, r"API token")
            r = c.get("/metrics", headers={"Authorization": "Bearer diag-token"})
            assert r.status_code == 200 and 'adapter="ad0"' in r.text
    finally:
        srv.stop()


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_and_health(client):
    assert client.get("/healthz").json() == {"alive": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    before = client.get("/metrics").text
    png = images()[0]
    for _ in range(3):
        assert client.post("/v1/diagnose", files={"file": ("a.png", png)}, data={"adapter": "ad3"}).status_code == 200
    client.post("/v1/diagnose", files={"file": ("a.png", png)}, data={"adapter": "nope"})
    after = client.get("/metrics").text
    ok = lambda t: _metric(t, "medlego_requests_total", adapter="ad3", outcome="ok", api="rest")  # noqa: E731
    assert ok(after) - ok(before) == 3
    nf = lambda t: _metric(t, "medlego_requests_total", outcome="not_found")  # noqa: E731
    assert nf(after) - nf(before) == 1
    for stage in ("decode", "queue", "inference"):
        assert _metric(after, "medlego_stage_seconds_count", stage=stage) >= _metric(before, "medlego_stage_seconds_count", stage=stage) + 3
    assert _metric(after, "medlego_batch_size_count") > _metric(before, "medlego_batch_size_count")
    assert _metric(after, "medlego_pool_resident_adapters", tier="device") >= 1
    assert _metric(after, "medlego_pool_hit_ratio", tier="device") > 0
    assert _metric(after, "medlego_pool_hits_total", tier="device") > _metric(before, "medlego_pool_hits_total", tier="device")
    assert _metric(after, "medlego_registry_adapters") >= 4 and _metric(after, "medlego_ready") == 1
    assert "medlego_pool_resident_bytes" in after and "medlego_request_seconds_bucket" in after
    kernel = client.get("/v1/info").json()["kernel"]  # the qkv path and how it was chosen (CPU: the reference)
    assert kernel["mode"] == "auto" and kernel["kernel"] == "torch" and kernel["cuda_graphs"] is False
    spec = client.get("/openapi.json").json()
    assert {"/v1/diagnose", "/v1/diagnose/batch", "/v1/adapters", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/diagnose"]["post"]["requestBody"]["content"]


def test_decode_pool_runs_torch_single_threaded(server):
    """Decode threads must not start OpenMP teams beside the engine's (see single_threaded_executor)."""
    main_threads = torch.get_num_threads()
    pool = server.service.executor
    assert {pool.submit(torch.get_num_threads).result() for _ in range(6)} == {1}
    assert torch.get_num_threads() == main_threads
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a new thread gets the default
    t.start()
    t.join()
    assert seen == [main_threads]
