"""The Open Inference Protocol through the Ray ingress: tritonclient over Ray Serve's HTTP and gRPC
proxies (one engine replica) gets the same probabilities as /v1/diagnose through the same ingress."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from backends import free_port
from conftest import TINY_MODEL
from medlego.jobs.synthetic import encode_png, random_adapter, random_image
from medlego.runtime.config import ServeConfig
from medlego.runtime.imaging import decode_image, preprocess
from medlego.runtime.registry import Registry


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_base, tiny_base_file):
    from medlego.serving.ray_app import ReplicaShape, start_local, stop_local

    data = tmp_path_factory.mktemp("ray-v2")
    reg = Registry(data, base=tiny_base.spec)
    for i, name in enumerate(("blood", "derma")):
        reg.register(name, random_adapter(tiny_base.spec, tiny_base.preprocess, rank=3, seed=80 + i).to_bytes())
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = TINY_MODEL, str(tiny_base_file)
    cfg.server.data_dir, cfg.server.host, cfg.server.port, cfg.server.grpc_port = str(data), "127.0.0.1", free_port(), free_port()
    cfg.batching.max_wait_ms = 2
    try:
        start_local(cfg, ReplicaShape(replicas=1, cpus=0.5, torch_threads=1), num_cpus=2)
        yield cfg
    finally:
        stop_local()


def test_v2_rest_and_grpc_through_the_ingress(ray_server, tiny_base):
    cfg = ray_server
    url = f"127.0.0.1:{cfg.server.port}"
    image = encode_png(random_image(31, 36))
    with httpx.Client(base_url="http://" + url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
        v1 = c.post("/v1/diagnose", files={"file": ("x.png", image)}, data={"adapter": "blood"})
        assert v1.status_code == 200, v1.text
    expected = np.array(list(v1.json()["probabilities"].values()))
    h = thttp.InferenceServerClient(url, network_timeout=60)
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{cfg.server.grpc_port}")
    try:
        assert h.is_server_live() and h.is_model_ready("blood") and g.is_model_ready("blood")
        assert g.get_model_metadata("derma").name == "derma"
        for client, module in ((h, thttp), (g, tgrpc)):
            inp = module.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([image], dtype=np.object_))
            r = client.infer("blood", [inp])
            np.testing.assert_allclose(r.as_numpy("probabilities")[0], expected, rtol=1e-5, atol=1e-5)  # float32: different batch compositions round differently
            with pytest.raises(InferenceServerException) as e:
                client.infer("nope", [inp])
            assert e.value.status() in ("404", "StatusCode.NOT_FOUND")
        # preprocessed tensors travel through the ingress to the replica: the same answer as the file
        tensor = preprocess(decode_image(image), tiny_base.preprocess)  # the adapters' own preprocessing
        pixels = thttp.InferInput("pixel_values", [1, *tensor.shape], "FP32")
        pixels.set_data_from_numpy(tensor.numpy()[None].astype(np.float32))
        r = h.infer("blood", [pixels])
        # preprocessed here (another process, other thread count) rather than in the replica: float32 rounding
        np.testing.assert_allclose(r.as_numpy("probabilities")[0], expected, atol=1e-5, rtol=0)
        wrong = thttp.InferInput("pixel_values", [1, 3, 8, 8], "FP32")
        wrong.set_data_from_numpy(np.ones((1, 3, 8, 8), np.float32))
        with pytest.raises(InferenceServerException) as e:
            h.infer("blood", [wrong])
        assert e.value.status() == "400" and "takes [3," in e.value.message()
    finally:
        h.close()
        g.close()
