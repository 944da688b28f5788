"""Ray Serve with direct ingress (`medlego serve --ray --direct-ingress`): the ingress replica serves
the configured REST and gRPC ports itself, while Ray's proxies sit on ports of their own; answers
equal the in-process engine's and carry the request id over both transports, for an image sent to
its replica by value and for one too large for that (sent by reference)."""

from __future__ import annotations

import grpc
import httpx
import pytest

pytest.importorskip("ray.serve")

from medlego.jobs.synthetic import encode_png, random_adapter, random_image  # noqa: E402
from medlego.runtime.base import load_base  # noqa: E402
from medlego.runtime.config import EngineConfig, ServeConfig  # noqa: E402
from medlego.runtime.engine import Engine  # noqa: E402
from medlego.runtime.errors import BadInputError  # noqa: E402
from medlego.runtime.imaging import decode_image, preprocess  # noqa: E402
from medlego.runtime.registry import Registry  # noqa: E402
from medlego.serving import medlego_pb2 as pb  # noqa: E402
from medlego.serving import medlego_pb2_grpc as pb_grpc  # noqa: E402

from backends import free_port  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402


def _proxy_ports() -> set[int]:
    """The ports Ray's HTTP and gRPC proxies were started on (the controller's configuration)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    controller = client._controller
    http, grpc_options = ray.get([controller.get_http_config.remote(), controller.get_grpc_config.remote()])
    return {http.port, grpc_options.port}


def test_the_ingress_serves_the_ports_itself_and_answers_like_the_engine(tmp_path, tiny_base, tiny_base_file):
    from medlego.serving.ray_app import ReplicaShape, start_local, stop_local

    reg = Registry(tmp_path, base=tiny_base.spec)
    adapter = random_adapter(tiny_base.spec, tiny_base.preprocess, rank=3, seed=71)
    reg.register("direct", adapter.to_bytes())
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = TINY_MODEL, str(tiny_base_file)
    cfg.server.data_dir, cfg.server.host = str(tmp_path), "127.0.0.1"
    cfg.server.port, cfg.server.grpc_port = free_port(), free_port()
    cfg.batching.max_wait_ms = 2
    png = encode_png(random_image(5, 32))
    # over the replica's gRPC message bound (4 MiB): it must go by reference
    large = encode_png(random_image(6, 1400))
    assert len(large) > 4 << 20
    base = load_base(TINY_MODEL, tiny_base_file)
    engine = Engine(base, Registry(tmp_path, base=base.spec), EngineConfig(slots=2))

    def expected(image: bytes) -> dict:
        answer = engine.infer(preprocess(decode_image(image), tiny_base.preprocess).unsqueeze(0), ["direct"])[0]
        assert answer.probabilities is not None
        return answer.probabilities

    try:
        start_local(cfg, ReplicaShape(replicas=1, cpus=0.5, torch_threads=1), num_cpus=2, direct_ingress=True)
        assert not {cfg.server.port, cfg.server.grpc_port} & _proxy_ports()  # so only the ingress can answer there
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.server.port}", timeout=60) as c:
            r = c.post("/v1/diagnose", files={"file": ("x.png", png)}, data={"adapter": "direct"},
                       headers={"X-Request-ID": "direct-1"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["adapter"] == "direct" and r.headers["x-request-id"] == "direct-1"
            assert "ingress_total" in body["timings_ms"]  # answered through the ingress, by a replica
            for label, p in expected(png).items():
                assert body["probabilities"][label] == pytest.approx(p, abs=1e-5)
            r = c.post("/v1/diagnose", files={"file": ("big.png", large)}, data={"adapter": "direct"})
            assert r.status_code == 200, r.text
            for label, p in expected(large).items():
                assert r.json()["probabilities"][label] == pytest.approx(p, abs=1e-5)
            assert c.post("/v1/diagnose", files={"file": ("x.png", png)}, data={"adapter": "nope"}).status_code == 404
        with grpc.insecure_channel(f"127.0.0.1:{cfg.server.grpc_port}") as ch:
            answer = pb_grpc.MedlegoStub(ch).Diagnose(pb.DiagnoseRequest(adapter="direct", image=png), timeout=60)
            assert answer.adapter == "direct" and answer.replica
    finally:
        stop_local()


def test_direct_ingress_is_refused_on_a_cluster_it_did_not_start(tmp_path):
    from medlego.serving.ray_app import start_local

    with pytest.raises(BadInputError, match="direct ingress is set when a Ray cluster starts"):
        start_local(ServeConfig(), address="127.0.0.1:1", direct_ingress=True)
