"""The Open Inference Protocol (KServe v2) with the real tritonclient, over HTTP and gRPC, against a
real embedded server on loopback: health, metadata, inference equal to /v1/diagnose, pixel_values,
one engine batch for concurrent requests naming different adapters, errors, tokens, body limit."""

from __future__ import annotations

import json
import re

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from medlego.jobs.synthetic import encode_dicom, encode_jpeg, encode_png, random_adapter, random_image
from medlego.runtime.config import BatchingConfig, Limits
from medlego.runtime.imaging import decode_image, preprocess
from medlego.runtime.registry import Registry
from medlego.serving.auth import Auth
from servers import start_server

TOKEN = "v2-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _h() -> dict:
    """The token for a tritonclient call (it adds its own headers to the dict it is given)."""
    return dict(BEARER)


GRPC_BEARER = {"authorization": f"Bearer {TOKEN}"}
NAMES = ["blood", "derma", "chest", "retina"]
BODY_LIMIT = 1_000_000
ELEMENT_CAP = 100_000  # values in one body: REST JSON, and each gRPC input tensor


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("kserve")
    reg = Registry(d, base=tiny_base.spec)
    for i, name in enumerate(NAMES):
        reg.register(name, random_adapter(tiny_base.spec, tiny_base.preprocess, rank=2 + i, seed=70 + i).to_bytes())
    reg.register("blood", random_adapter(tiny_base.spec, tiny_base.preprocess, rank=3, seed=90).to_bytes())  # blood@2
    reg.set_alias("hematology", "blood@1")
    return d


@pytest.fixture(scope="module")
def server(tiny_base_file, data_dir):
    # a long batching window: concurrent requests meet in one engine batch
    srv = start_server(tiny_base_file, data_dir, auth=Auth(api_token=TOKEN),
                       limits=Limits(max_body_bytes=BODY_LIMIT, max_image_bytes=BODY_LIMIT // 2,
                                     max_json_elements=ELEMENT_CAP),
                       batching=BatchingConfig(max_batch=16, max_wait_ms=250), grpc=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http_client(server):
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4, network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    c = tgrpc.InferenceServerClient(server.grpc_target)
    yield c
    c.close()


def _images():
    return [encode_png(random_image(21, 40)), encode_jpeg(random_image(22, 30)),
            encode_dicom(random_image(23, 34, rgb=False).astype(np.float32) / 255.0), encode_png(random_image(24, 32))]


def _v1(client, image: bytes, adapter: str) -> np.ndarray:
    r = client.post("/v1/diagnose", files={"file": ("x", image)}, data={"adapter": adapter}, headers=BEARER)
    assert r.status_code == 200, r.text
    return np.array(list(r.json()["probabilities"].values()), dtype=np.float64)


def _image_input(module, images: list[bytes], binary: bool = True):
    inp = module.InferInput("image", [len(images)], "BYTES")
    arr = np.array(images, dtype=np.object_)
    if module is thttp:
        inp.set_data_from_numpy(arr, binary_data=binary)
    else:
        inp.set_data_from_numpy(arr)
    return inp


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- health and metadata ---------------------------------------------------------------------------
def test_health_and_server_metadata(http_client, grpc_client, server):
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    meta = http_client.get_server_metadata()
    assert meta["name"] == "medlego" and "binary_tensor_data" in meta["extensions"]
    assert grpc_client.get_server_metadata(as_json=True)["name"] == "medlego"
    assert httpx.get(server.url + "/v2/health/live").status_code == 200  # open, like /healthz


def test_model_ready_and_metadata(http_client, grpc_client, client, data_dir):
    for c, headers in ((http_client, None), (grpc_client, GRPC_BEARER)):
        assert c.is_model_ready("blood", headers=headers or _h())
        assert c.is_model_ready("blood", "1", headers=headers or _h())
        assert c.is_model_ready("hematology", headers=headers or _h())  # an alias is a model name
        assert not c.is_model_ready("no-such-model", headers=headers or _h())
    desc = client.get("/v1/adapters/blood", headers=BEARER).json()
    meta = http_client.get_model_metadata("blood", headers=_h())
    assert meta["name"] == "blood" and meta["versions"] == ["1", "2"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "pixel_values": ("FP32", [-1, 3, 32, 32]), "task": ("BYTES", [-1])}
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    params = meta["parameters"]
    assert params["sha256"] == desc["sha256"] and params["ref"] == "blood@2"
    assert json.loads(params["labels"]) == desc["tasks"][0]["labels"]
    assert json.loads(params["preprocess"]) == desc["preprocess"]
    g = grpc_client.get_model_metadata("blood", "1", headers=GRPC_BEARER)
    assert g.name == "blood" and [t.name for t in g.inputs] == ["image", "pixel_values", "task"]
    assert list(g.outputs[0].shape) == [-1, 3]


# -- inference ---------------------------------------------------------------------------------------
def test_infer_image_equals_v1_over_http_and_grpc(http_client, grpc_client, client):
    images = _images()
    for n, image in enumerate(images):
        expected = _v1(client, image, "blood")
        h = http_client.infer("blood", [_image_input(thttp, [image])],
                              outputs=[thttp.InferRequestedOutput("probabilities")], headers=_h())
        g = grpc_client.infer("blood", [_image_input(tgrpc, [image])], headers=GRPC_BEARER)
        for r in (h, g):
            p = r.as_numpy("probabilities")
            assert p.dtype == np.float32 and p.shape == (1, 3)
            np.testing.assert_allclose(p[0], expected, rtol=1e-5, atol=1e-5)  # float32: different batch compositions round differently
        assert h.get_response()["model_version"] == "2"
    # a batch of N images in one request, a version, an alias
    expected = np.stack([_v1(client, img, "blood@1") for img in images])
    for model, version in (("blood", "1"), ("hematology", "")):
        h = http_client.infer(model, [_image_input(thttp, images)], model_version=version, headers=_h())
        g = grpc_client.infer(model, [_image_input(tgrpc, images)], model_version=version, headers=GRPC_BEARER)
        for r in (h, g):
            np.testing.assert_allclose(r.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-5)  # float32: different batch compositions round differently


def test_pixel_values_give_the_same_result(http_client, grpc_client, client, server):
    images = _images()
    pre = server.service.engine.resolve("derma").preprocess
    pixels = np.stack([preprocess(decode_image(img), pre).numpy() for img in images]).astype(np.float32)
    expected = np.stack([_v1(client, img, "derma") for img in images])
    for binary in (True, False):  # binary tensor extension, and plain JSON numbers
        inp = thttp.InferInput("pixel_values", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels, binary_data=binary)
        out = thttp.InferRequestedOutput("probabilities", binary_data=binary)
        r = http_client.infer("derma", [inp], outputs=[out], headers=_h())
        np.testing.assert_allclose(r.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-5)  # float32: different batch compositions round differently
    inp = tgrpc.InferInput("pixel_values", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    r = grpc_client.infer("derma", [inp], headers=GRPC_BEARER)
    np.testing.assert_allclose(r.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-5)  # float32: different batch compositions round differently


def test_concurrent_requests_for_different_adapters_share_one_engine_batch(http_client, client):
    images = _images()
    before = client.get("/metrics", headers=BEARER).text
    pending = [http_client.async_infer(name, [_image_input(thttp, [img])], headers=_h())
               for name, img in zip(NAMES, images)]
    results = [p.get_result() for p in pending]
    after = client.get("/metrics", headers=BEARER).text
    batches = _metric(after, "medlego_batch_size_count") - _metric(before, "medlego_batch_size_count")
    images_run = _metric(after, "medlego_batch_size_sum") - _metric(before, "medlego_batch_size_sum")
    assert (batches, images_run) == (1, 4), (batches, images_run)
    for name, img, r in zip(NAMES, images, results):
        np.testing.assert_allclose(r.as_numpy("probabilities")[0], _v1(client, img, name), rtol=1e-5, atol=1e-5)  # float32: different batch compositions round differently
    assert 'api="v2"' in after and 'outcome="ok"' in after


# -- errors ------------------------------------------------------------------------------------------
def test_bad_image_is_400_and_invalid_argument(http_client, grpc_client, server):
    with pytest.raises(InferenceServerException) as e:
        http_client.infer("blood", [_image_input(thttp, [b"not an image"])], headers=_h())
    assert e.value.status() == "400" and "image" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        grpc_client.infer("blood", [_image_input(tgrpc, [b"not an image"])], headers=GRPC_BEARER)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    # malformed bodies: one-line {"error": ...} with 400, never a 500
    for body, headers in ((b"{", {}), (b'{"inputs": []}', {}), (b'{"inputs": [{"name": "image", "shape": [2], '
                          b'"datatype": "BYTES", "data": ["a"]}]}', {}),
                          (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": '
                           b'{"binary_data_size": 99}}]}', {"Inference-Header-Content-Length": "95"})):
        r = httpx.post(server.url + "/v2/models/blood/infer", content=body, headers={**BEARER, **headers})
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    nan = np.full((1, 3, 32, 32), np.nan, np.float32).tobytes()
    header = (b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", '
              b'"parameters": {"binary_data_size": %d}}]}' % len(nan))
    bad = [{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [["a"], "b", ["c", ["d"]]]}]},
           {"inputs": [{"name": "image", "shape": [1], "datatype": "INT8", "data": [1]}]},
           {"inputs": [{"name": "pixel_values", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]},
           {"inputs": [{"name": "pixel_values", "shape": [1, 2], "datatype": "FP32", "data": [[0.0, "x"]]}]},
           {"inputs": [{"name": "volume", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
           {"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]},
           {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "outputs": [{"name": "x"}]},
           {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [{"b64": "!!"}]}]}]
    cases = [(json.dumps(b).encode(), {}) for b in bad] + [(header + nan, {"Inference-Header-Content-Length": str(len(header))})]
    for body, headers in cases:
        r = httpx.post(server.url + "/v2/models/blood/infer", content=body, headers={**BEARER, **headers})
        assert r.status_code == 400 and set(r.json()) == {"error"}, (body[:120], r.text)


def test_unknown_model_is_404_and_not_found(http_client, grpc_client, server):
    for call in (lambda: http_client.get_model_metadata("nope", headers=_h()),
                 lambda: http_client.infer("nope", [_image_input(thttp, _images()[:1])], headers=_h()),
                 lambda: http_client.get_model_metadata("blood", "7", headers=_h())):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        grpc_client.infer("nope", [_image_input(tgrpc, _images()[:1])], headers=GRPC_BEARER)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    r = httpx.get(server.url + "/v2/models/nope", headers=BEARER)
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_grpc_tensor_above_the_element_cap_is_refused_before_it_is_built(server):
    """ModelInfer's input is capped like the REST body: a tensor of more elements than max_json_elements
    (here 100,000 fp32_contents in a 0.4 MB message, under the upload limit) is RESOURCE_EXHAUSTED with
    the reason, and one within the cap still answers."""
    from medlego.serving import kserve_v2_pb2 as v2
    from medlego.serving import kserve_v2_pb2_grpc as v2_grpc

    def request(n_images: int):
        values = np.random.default_rng(3).random(n_images * 3 * 32 * 32, dtype=np.float32)
        t = v2.ModelInferRequest.InferInputTensor(name="pixel_values", datatype="FP32", shape=[n_images, 3, 32, 32])
        t.contents.fp32_contents.extend(values.tolist())
        return v2.ModelInferRequest(model_name="blood", inputs=[t])

    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        big = request(ELEMENT_CAP // (3 * 32 * 32) + 1)
        assert big.ByteSize() < BODY_LIMIT
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(big, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 100000" in (e.value.details() or "")
        ok = stub.ModelInfer(request(2), metadata=[("authorization", f"Bearer {TOKEN}")])
        assert list(ok.outputs[0].shape)[0] == 2 and ok.parameters["sha256"].string_param


def test_token_body_limit_reflection_and_health(http_client, grpc_client, server):
    with pytest.raises(InferenceServerException) as e:
        http_client.infer("blood", [_image_input(thttp, _images()[:1])])
    assert e.value.status() == "401"
    with pytest.raises(InferenceServerException) as e:
        grpc_client.get_model_metadata("blood", headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    r = httpx.post(server.url + "/v2/models/blood/infer", content=b"x" * (BODY_LIMIT + 1), headers=BEARER)
    assert r.status_code == 413 and set(r.json()) == {"error"}
    with grpc.insecure_channel(server.grpc_target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "medlego.v1.Medlego"} <= names
        assert answers[1].file_descriptor_response.file_descriptor_proto
