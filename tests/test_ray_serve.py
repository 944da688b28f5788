"""Ray Serve on the CPU: 2 engine replicas behind the FastAPI ingress; requests for an adapter go to
the replica that holds it (multiplexing hit ratio), answers equal the engine's, hot registration
and the gRPC proxy work. One deployment for the whole module (Ray start-up is the slow part)."""

from __future__ import annotations

import collections
import hashlib
import concurrent.futures as cf
import time

import grpc
import httpx
import pytest
import torch

pytest.importorskip("ray.serve")

from medlego.runtime.base import load_base  # noqa: E402
from medlego.runtime.config import EngineConfig  # noqa: E402
from medlego.runtime.engine import Engine  # noqa: E402
from medlego.runtime.imaging import decode_image, preprocess  # noqa: E402
from medlego.runtime.registry import audit  # noqa: E402
from medlego.runtime.registry import Registry  # noqa: E402
from medlego.jobs.synthetic import random_adapter  # noqa: E402
from medlego.serving import medlego_pb2 as pb  # noqa: E402
from medlego.serving import medlego_pb2_grpc as pb_grpc  # noqa: E402
from medlego.runtime.config import ServeConfig  # noqa: E402
from medlego.jobs.synthetic import encode_png, random_image  # noqa: E402

from backends import free_port  # noqa: E402
from waiting import wait_until  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402

ADAPTERS = [f"r{i}" for i in range(6)]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_base, tiny_base_file):
    from medlego.serving.ray_app import ReplicaShape, start_local, stop_local

    data = tmp_path_factory.mktemp("ray")
    reg = Registry(data, base=tiny_base.spec)
    for i, name in enumerate(ADAPTERS):
        reg.register(name, random_adapter(tiny_base.spec, tiny_base.preprocess, rank=2 + i % 3, seed=60 + i).to_bytes())
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = TINY_MODEL, str(tiny_base_file)
    cfg.server.data_dir, cfg.server.host, cfg.server.port, cfg.server.grpc_port = str(data), "127.0.0.1", free_port(), free_port()
    cfg.auth.admin_token = "ray-admin"
    cfg.batching.max_wait_ms = 2
    cfg.engine.slots = 8
    try:
        start_local(cfg, ReplicaShape(replicas=2, cpus=0.5, torch_threads=1), num_cpus=2)
        yield cfg, data
    finally:
        stop_local()


def _both_replicas_running() -> bool:
    from ray import serve

    from medlego.serving.ray_app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return False
    # ReplicaState is a str enum that Ray exports only privately: match it by its value
    states = app.deployments["MedlegoReplica"].replica_states
    return sum(n for state, n in states.items() if state == "RUNNING") == 2


def _diagnose(url, ref, png):
    with httpx.Client(base_url=url, timeout=60) as c:
        return c.post("/v1/diagnose", files={"file": ("x.png", png)}, data={"adapter": ref})


def test_requests_go_to_the_replica_holding_their_adapter(ray_server, tiny_base_file):
    cfg, data = ray_server
    url = f"http://127.0.0.1:{cfg.server.port}"
    pngs = [encode_png(random_image(s, 32)) for s in range(4)]
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
    wait_until(_both_replicas_running, timeout=120, interval=0.2, what="2 running replicas")
    # cold, one after another: Ray sends an id no replica holds to the replica holding the fewest, so
    # the adapters spread over both replicas, if both are running (/readyz needs only one)
    first = [_diagnose(url, ref, pngs[0]) for ref in ADAPTERS]
    assert all(r.status_code == 200 for r in first), [r.text for r in first]
    time.sleep(0.5)  # replicas push the ids they hold to Serve's routers every 0.1 s
    cases = [(ADAPTERS[n % len(ADAPTERS)], pngs[n % len(pngs)]) for n in range(48)]
    with cf.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda c: _diagnose(url, *c), cases))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    bodies = [r.json() for r in rs]
    by_adapter = collections.defaultdict(collections.Counter)
    for b in bodies:
        by_adapter[b["adapter"]][b["replica"]] += 1
    hit_ratio = sum(b["multiplex_hit"] for b in bodies) / len(bodies)
    affinity = sum(max(c.values()) for c in by_adapter.values()) / len(bodies)
    replicas = {r for c in by_adapter.values() for r in c}
    print(f"\nmultiplexing: hit ratio {hit_ratio:.3f} over {len(bodies)} warm requests, "
          f"affinity {affinity:.3f}, replicas used {len(replicas)}: "
          + ", ".join(f"{a}->{dict(c)}" for a, c in sorted(by_adapter.items())))
    assert len(replicas) == 2  # the adapters are spread over both replicas
    assert hit_ratio >= 0.9 and affinity >= 0.9

    base = load_base(TINY_MODEL, tiny_base_file)
    engine = Engine(base, Registry(data, base=base.spec), EngineConfig(slots=8))
    pixels = torch.stack([preprocess(decode_image(png), engine.resolve(ref).preprocess) for ref, png in cases[:12]])
    expected = engine.infer(pixels, [ref for ref, _ in cases[:12]])
    for b, exp in zip(bodies[:12], expected):
        assert b["sha256"] == exp.sha256
        for label, p in exp.probabilities.items():
            assert b["probabilities"][label] == pytest.approx(p, abs=1e-5)


def test_hot_registration_errors_and_grpc_through_ray(ray_server, tiny_base):
    cfg, _ = ray_server
    url = f"http://127.0.0.1:{cfg.server.port}"
    png = encode_png(random_image(9, 32))
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/diagnose", files={"file": ("x.png", png)}, data={"adapter": "r"},
                   headers={"X-Request-ID": "ray-miss-1"})
        assert r.status_code == 404 and "did you mean r0, r1" in r.json()["detail"]
        r = c.post("/v1/diagnose", files={"file": ("x.png", b"junk")}, data={"adapter": "r0"})
        assert r.status_code == 400 and "PNG, JPEG or DICOM" in r.json()["detail"]
        new = random_adapter(tiny_base.spec, tiny_base.preprocess, rank=3, seed=99).to_bytes()
        assert c.post("/v1/adapters", files={"file": ("n.safetensors", new)}, data={"name": "fresh"}).status_code == 401
        r = c.post("/v1/adapters", headers={"Authorization": "Bearer ray-admin"},
                   files={"file": ("n.safetensors", new)}, data={"name": "fresh"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/diagnose", files={"file": ("x.png", png)}, data={"adapter": "fresh"},
                   headers={"X-Request-ID": "ray-study-1"})
        assert r.status_code == 200 and r.json()["adapter"] == "fresh"
        assert r.headers["x-request-id"] == "ray-study-1"
        # the replicas' audit rows carry the ingress's request id, caller and front-door API
        index = Registry(cfg.server.data_dir).index
        rows: list = []
        for _ in range(50):
            rows = [row for row in audit.query(index) if row.get("request_id") == "ray-study-1"]
            if rows:
                break
            time.sleep(0.1)
        assert [(x["kind"], x["caller"], x["api"], x["adapter"]) for x in rows] == [
            ("diagnosis", "anonymous", "rest", "fresh@1")], rows
        assert any(x["kind"] == "admin" and x["caller"] == "admin" and x["api"] == "rest" for x in audit.query(index))
        # refused at the ingress, so no replica saw them: the ingress audits those itself (its own writer,
        # flushed on its own clock: wait for its rows)
        def ingress_rows():
            rows = audit.query(index)
            return ([x for x in rows if x.get("request_id") == "ray-miss-1"],
                    [x for x in rows if x["kind"] == "refused" and x.get("action") == "admin"])

        for _ in range(100):
            missed, admin_refused = ingress_rows()
            if missed and admin_refused:
                break
            time.sleep(0.1)
        assert [(x["kind"], x["outcome"], x["requested"], x["image_sha256"]) for x in missed] == [
            ("refused", "not_found", "r", hashlib.sha256(png).hexdigest())], missed
        assert admin_refused, audit.query(index)
        r = c.post("/v1/adapters", headers={"Authorization": "Bearer ray-admin"},
                   files={"file": ("n.safetensors", b"\0" * 32)}, data={"name": "junk"})
        assert r.status_code == 422 and "safetensors" in r.json()["detail"]
        assert "medlego_requests_total" in c.get("/metrics").text
        info = c.get("/v1/info").json()  # a replica's view: pool, multiplexing, Ray metrics bridge
        assert info["ray_metrics"]["syncs"] >= 1 and info["ray_metrics"]["last_error"] is None
        assert info["multiplex"]["requests"] >= 1 and info["pool"]["device_slots"] == 8

    with grpc.insecure_channel(f"127.0.0.1:{cfg.server.grpc_port}") as ch:
        stub = pb_grpc.MedlegoStub(ch)
        answer, call = stub.Diagnose.with_call(pb.DiagnoseRequest(adapter="r2", image=png), timeout=60,
                                               metadata=[("x-request-id", "ray-grpc-1")])
        assert answer.adapter == "r2" and answer.replica
        assert ("x-request-id", "ray-grpc-1") in call.trailing_metadata()  # echoed through Ray's gRPC proxy too
        with pytest.raises(grpc.RpcError) as e:
            stub.Diagnose(pb.DiagnoseRequest(adapter="missing", image=png), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown adapter 'missing'" in e.value.details()
        assert "fresh@1" in {a.ref for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters}


def _replica_deployment(app):
    """The engine replicas' deployment inside a built app (the ingress's first init arg)."""
    return app._bound_deployment.init_args[0]._bound_deployment


def test_serve_deploy_config_is_valid_and_builds(tiny_base_file, tmp_path):
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from medlego.runtime.errors import BadInputError
    from medlego.serving.ray_app import app_builder

    path = Path(__file__).resolve().parents[1] / "medlego" / "serving" / "ray_config.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "medlego.serving.ray_app:app_builder"
    assert schema.grpc_options.grpc_servicer_functions == ["medlego.serving.medlego_pb2_grpc.add_MedlegoServicer_to_server"]
    args = {**app_cfg.args, "weights": str(tiny_base_file), "model": TINY_MODEL, "data_dir": str(tmp_path),
            "replica_gpus": 0, "device": "cpu"}
    assert {"registry_url", "registry_store", "registry_cache_dir", "autoscaling"} <= set(args)
    assert "{node}" in args["registry_cache_dir"]

    # the YAML's autoscaling becomes Ray's autoscaling_config (no fixed count); resources place replicas
    replica = _replica_deployment(app_builder({**args, "replica_resources": {"medlego": 1}}))
    scaling = replica._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (
        args["autoscaling"]["min_replicas"], args["autoscaling"]["max_replicas"],
        args["autoscaling"]["target_ongoing_requests"])
    assert replica.ray_actor_options["resources"] == {"medlego": 1}
    assert replica.ray_actor_options["num_cpus"] == args["replica_cpus"]
    config = replica.init_args[0]  # what every replica builds its service from
    assert config["registry"]["url"] == args["registry_url"] and config["registry"]["store"] == args["registry_store"]
    assert config["registry"]["cache_dir"] == args["registry_cache_dir"]  # {node} is replaced in the replica

    fixed = {k: v for k, v in args.items() if k != "autoscaling"}
    replica = _replica_deployment(app_builder({**fixed, "replicas": 3}))
    assert replica.num_replicas == 3 and replica._deployment_config.autoscaling_config is None
    with pytest.raises(BadInputError, match="not both"):
        app_builder({**args, "replicas": 3})
    with pytest.raises(BadInputError, match=r"unknown app arg\(s\) \['autoscale'\]"):
        app_builder({**fixed, "autoscale": {"max_replicas": 2}})
    with pytest.raises(BadInputError, match=r"unknown autoscaling setting\(s\) \['max_replica'\]"):
        app_builder({**fixed, "autoscaling": {"max_replica": 2}})
    with pytest.raises(BadInputError, match="invalid replica settings"):
        app_builder({**fixed, "autoscaling": {"min_replicas": 3, "max_replicas": 1}})
