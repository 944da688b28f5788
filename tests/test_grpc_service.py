"""The gRPC API over a real socket: answers equal the engine's, admin by metadata token, status codes,
standard health service and server reflection."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import TINY_MODEL
from medlego.jobs.synthetic import encode_dicom, encode_jpeg, encode_png, random_adapter, random_image
from medlego.runtime.base import load_base
from medlego.runtime.config import BatchingConfig, EngineConfig, Limits
from medlego.runtime.engine import Engine
from medlego.runtime.imaging import decode_image, preprocess
from medlego.runtime.registry import Registry
from medlego.serving import medlego_pb2 as pb
from medlego.serving import medlego_pb2_grpc as pb_grpc
from medlego.serving.auth import Auth
from servers import start_server

ADMIN = [("authorization", "Bearer grpc-admin")]


def _server(base_file, data_dir, auth):
    return start_server(base_file, data_dir, auth=auth, limits=Limits(max_image_bytes=200_000),
                        batching=BatchingConfig(max_wait_ms=3), grpc=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("grpc")
    reg = Registry(d, base=tiny_base.spec)
    for i in range(3):
        reg.register(f"g{i}", random_adapter(tiny_base.spec, tiny_base.preprocess, rank=2 + 2 * i, seed=30 + i).to_bytes())
    return d


@pytest.fixture(scope="module")
def server(tiny_base_file, data_dir):
    srv = _server(tiny_base_file, data_dir, Auth(admin_token="grpc-admin"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.grpc_target)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.MedlegoStub(channel)


def _images():
    return [encode_png(random_image(11, 40)), encode_jpeg(random_image(12, 30)),
            encode_dicom(random_image(13, 34, rgb=False).astype(np.float32) / 255.0), encode_png(random_image(14, 32, rgb=False))]


def test_diagnose_several_adapters_matches_engine(stub, tiny_base_file, data_dir):
    imgs = _images()
    cases = [(imgs[n % 4], f"g{n % 3}") for n in range(9)]
    futures = [stub.Diagnose.future(pb.DiagnoseRequest(adapter=ref, image=img, top_k=2)) for img, ref in cases]
    answers = [f.result(timeout=60) for f in futures]
    batch = stub.DiagnoseBatch(pb.DiagnoseBatchRequest(items=[pb.DiagnoseRequest(adapter=ref, image=img) for img, ref in cases]))

    base = load_base(TINY_MODEL, tiny_base_file)
    engine = Engine(base, Registry(data_dir, base=base.spec), EngineConfig(slots=8))
    pixels = torch.stack([preprocess(decode_image(img), engine.resolve(ref).preprocess) for img, ref in cases])
    expected = engine.infer(pixels, [ref for _, ref in cases])
    for a, b, exp, (_, ref) in zip(answers, batch.results, expected, cases):
        assert a.adapter == ref and a.version == 1 and a.sha256 == exp.sha256 and a.task == exp.task
        assert len(a.top) == 2 and a.top[0].probability == max(a.probabilities.values())
        for label, p in exp.probabilities.items():
            assert a.probabilities[label] == pytest.approx(p, abs=1e-5)
            assert b.probabilities[label] == pytest.approx(p, abs=1e-5)
        assert {"decode", "queue", "inference"} <= set(a.timings_ms)


def test_list_describe_register_delete(stub, tiny_base):
    listing = stub.ListAdapters(pb.ListAdaptersRequest())
    assert {"g0@1", "g1@1", "g2@1"} <= {a.ref for a in listing.adapters}
    info = stub.DescribeAdapter(pb.DescribeAdapterRequest(ref="g1"))
    assert info.ref == "g1@1" and info.max_rank == 4 and info.tasks[0].name == "task31"
    assert json.loads(info.metadata_json)["base"]["fingerprint"] == tiny_base.fingerprint

    data = random_adapter(tiny_base.spec, tiny_base.preprocess, rank=3, seed=55).to_bytes()
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterAdapter(pb.RegisterAdapterRequest(name="up", data=data))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterAdapter(pb.RegisterAdapterRequest(name="up", data=data), metadata=[("authorization", "Bearer no")])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "wrong admin token" in e.value.details()
    info = stub.RegisterAdapter(pb.RegisterAdapterRequest(name="up", data=data, aliases=["up-alias"]), metadata=ADMIN)
    assert info.ref == "up@1" and list(info.aliases) == ["up-alias"]
    answer = stub.Diagnose(pb.DiagnoseRequest(adapter="up-alias", image=_images()[0]))
    assert answer.adapter == "up" and answer.sha256 == info.sha256

    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterAdapter(pb.RegisterAdapterRequest(name="junk", data=b"\x00" * 40), metadata=ADMIN)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteAdapter(pb.DeleteAdapterRequest(ref="up@1"), metadata=ADMIN)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "alias" in e.value.details()


def test_status_codes(stub):
    png = _images()[0]
    cases = [
        (pb.DiagnoseRequest(adapter="g", image=png), grpc.StatusCode.NOT_FOUND, "did you mean g0, g1, g2?"),
        (pb.DiagnoseRequest(adapter="g0", task="lung", image=png), grpc.StatusCode.NOT_FOUND, "unknown task 'lung'"),
        (pb.DiagnoseRequest(adapter="g0", image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "PNG, JPEG or DICOM"),
        (pb.DiagnoseRequest(adapter="g0", image=png[:50]), grpc.StatusCode.INVALID_ARGUMENT, "cannot decode PNG"),
        (pb.DiagnoseRequest(adapter="", image=png), grpc.StatusCode.INVALID_ARGUMENT, "'adapter' is required"),
        (pb.DiagnoseRequest(adapter="g0", image=png + b"\0" * 200_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
    ]
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.Diagnose(req)
        assert e.value.code() == code and text in e.value.details(), (code, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.DescribeAdapter(pb.DescribeAdapterRequest(ref="nope@2"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Diagnose(pb.DiagnoseRequest(adapter="g0", image=png)).adapter == "g0"  # still serving


def test_health_and_reflection(stub, channel):
    h = stub.Health(pb.HealthRequest())
    assert h.alive and h.ready and h.adapters >= 3 and h.device == "cpu"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "medlego.v1.Medlego"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"medlego.v1.Medlego", "grpc.health.v1.Health"} <= names


def test_admin_closed_without_token(tiny_base_file, data_dir, tiny_base):
    srv = _server(tiny_base_file, data_dir, Auth(admin_token=None, api_token="api"))
    try:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.MedlegoStub(ch)
            data = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=56).to_bytes()
            with pytest.raises(grpc.RpcError) as e:
                stub.RegisterAdapter(pb.RegisterAdapterRequest(name="x", data=data), metadata=[("authorization", "Bearer api")])
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "closed" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.Diagnose(pb.DiagnoseRequest(adapter="g0", image=_images()[0]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Diagnose(pb.DiagnoseRequest(adapter="g0", image=_images()[0]), metadata=[("authorization", "Bearer api")])
            assert ok.adapter == "g0"
    finally:
        srv.stop()
