"""Adapters above a server's rank limit (issue 27): refused (the default), or with `over_rank = "truncate"`
served at max_rank with their top singular directions — the same adapter as the merge capped with
`--max-rank N` — and the dropped share of singular-value mass reported at registration, in describe,
in every answer and in the audit row."""

from __future__ import annotations

import io

import httpx
import pytest
import torch

from medlego.jobs.synthetic import encode_png, random_adapter
from medlego.runtime.adapter import top_directions, truncate_rank
from medlego.runtime.adapter_merge import merge_adapters
from medlego.runtime.config import ServeConfig
from medlego.serving.server import EmbeddedServer
from medlego.serving.service import DiagnosisService

from conftest import TINY_MODEL

ADMIN = "admin-token-for-rank-tests"
CAP = 6


@pytest.fixture(scope="module")
def merged(tiny_base):
    """A Med-LEGO merge of three rank-4 adapters, uncapped (rank up to 12) and capped at CAP."""
    sources = [random_adapter(tiny_base.spec, tiny_base.preprocess, rank=4, seed=s, scale=0.2) for s in (1, 2, 3)]
    full, _ = merge_adapters(sources, "med-lego", {"threshold": 1.0})
    capped, _ = merge_adapters(sources, "med-lego", {"threshold": 1.0, "max_rank": CAP})
    assert full.max_rank > CAP
    return full, capped


def test_truncation_is_the_merge_capped_at_max_rank(merged):
    full, capped = merged
    for _, _, m in full.matrices():  # SVD-LoRA's E comes ordered: the top directions are its first ones
        assert bool((m.E[:-1] >= m.E[1:]).all())
    served, report = truncate_rank(full, CAP)
    assert served.max_rank == CAP and report["served_rank"] == CAP and report["rank"] == full.max_rank
    for (i, t, mine), (_, _, theirs) in zip(served.matrices(), capped.matrices()):
        assert torch.allclose(mine.delta(), theirs.delta(), atol=1e-6, rtol=1e-4), (i, t)
    dropped = sum(float(m.E[CAP:].abs().sum()) for _, _, m in full.matrices())
    total = sum(float(m.E.abs().sum()) for _, _, m in full.matrices())
    assert report["dropped_mass"] == pytest.approx(dropped / total, abs=1e-6) and 0 < report["dropped_mass"] < 1


def test_an_unsorted_spectrum_is_sorted_first():
    from medlego.runtime.adapter import LowRank

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    m = LowRank(a, torch.tensor([0.1, 3.0, -2.0, 0.5]), b)
    kept, dropped, total = top_directions(m, 2)
    assert kept.E.tolist() == [3.0, -2.0] and torch.equal(kept.A, a[[1, 2]]) and torch.equal(kept.B, b[:, [1, 2]])
    assert (dropped, total) == pytest.approx((0.6, 5.6))


def _server(base_file, data_dir, over_rank: str, grpc_port: int | None = None) -> EmbeddedServer:
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = TINY_MODEL, str(base_file)
    cfg.server.data_dir = str(data_dir)
    cfg.engine.max_rank, cfg.engine.over_rank, cfg.engine.slots = CAP, over_rank, 4
    cfg.auth.admin_token = ADMIN
    return EmbeddedServer(DiagnosisService.from_config(cfg), host="127.0.0.1", port=0, grpc_port=grpc_port).start()


def _register(client, name, adapter):
    return client.post("/v1/adapters", files={"file": ("a.safetensors", adapter.to_bytes())}, data={"name": name},
                       headers={"Authorization": f"Bearer {ADMIN}"})


def test_refused_by_default(tmp_path, tiny_base_file, merged):
    srv = _server(tiny_base_file, tmp_path / "reg", "refuse")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = _register(c, "general", merged[0])
            assert r.status_code == 422 and "above the configured maximum 6" in r.json()["detail"], r.text
    finally:
        srv.stop()


def test_served_truncated_with_the_dropped_mass_everywhere(tmp_path, tiny_base_file, tiny_base, merged):
    full, capped = merged
    expected = truncate_rank(full, CAP)[1]
    srv = _server(tiny_base_file, tmp_path / "reg", "truncate")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = _register(c, "general", full)
            assert r.status_code == 201, r.text
            assert r.json()["rank_truncation"] == expected  # at registration
            assert _register(c, "capped", capped).status_code == 201
            described = c.get("/v1/adapters/general").json()
            assert described["rank_truncation"] == expected and described["max_rank"] == full.max_rank
            assert "rank_truncation" not in c.get("/v1/adapters/capped").json()
            image = encode_png(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(5)).numpy())
            answers = {}
            for name in ("general", "capped"):
                a = c.post("/v1/diagnose", files={"file": ("x.png", io.BytesIO(image))},
                           data={"adapter": name, "task": full.task_names[0]})
                assert a.status_code == 200, a.text
                answers[name] = a.json()
            assert answers["general"]["rank_truncation"] == expected  # in every answer
            assert "rank_truncation" not in answers["capped"]
            for label, p in answers["capped"]["probabilities"].items():  # served = the merge capped at CAP
                assert answers["general"]["probabilities"][label] == pytest.approx(p, abs=1e-5)
    finally:
        srv.stop()
    from medlego.runtime.registry import Registry
    from medlego.runtime.registry.audit import query

    rows = query(Registry(tmp_path / "reg").index, kind="diagnosis", adapter="general")
    assert rows and all(row["rank_truncation"] == expected for row in rows)  # and in the audit row


def test_truncation_in_v2_and_grpc_answers(tmp_path, tiny_base_file, merged):
    """The same report in the Open Inference Protocol's answer `parameters` (REST and gRPC, read with
    tritonclient) and in medlego.v1's DiagnoseResponse and DescribeAdapter over gRPC."""
    import json

    import grpc
    import numpy as np
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    from medlego.serving import medlego_pb2 as pb
    from medlego.serving import medlego_pb2_grpc as pb_grpc

    full, capped = merged
    expected = truncate_rank(full, CAP)[1]
    assert expected is not None
    task = full.task_names[0]
    image = encode_png(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(6)).numpy())
    srv = _server(tiny_base_file, tmp_path / "reg", "truncate", grpc_port=0)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert _register(c, "general", full).status_code == 201 and _register(c, "capped", capped).status_code == 201
        v2_params = {}
        for name in ("general", "capped"):
            for kind, module, client in (("http", thttp, thttp.InferenceServerClient(srv.url.removeprefix("http://"))),
                                         ("grpc", tgrpc, tgrpc.InferenceServerClient(srv.grpc_target))):
                inp = module.InferInput("image", [1], "BYTES")
                inp.set_data_from_numpy(np.array([image], dtype=np.object_))
                task_in = module.InferInput("task", [1], "BYTES")
                task_in.set_data_from_numpy(np.array([task.encode()], dtype=np.object_))
                response = client.infer(name, [inp, task_in]).get_response()  # type: ignore[union-attr]
                params = response["parameters"] if kind == "http" else {  # type: ignore[index]
                    k: v.string_param for k, v in response.parameters.items()}  # type: ignore[union-attr]
                v2_params[name, kind] = params
        for kind in ("http", "grpc"):
            assert json.loads(v2_params["general", kind]["rank_truncation"]) == expected, kind
            assert "rank_truncation" not in v2_params["capped", kind] and v2_params["capped", kind]["sha256"]
        assert srv.grpc_target is not None
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.MedlegoStub(ch)
            for name, truncated in (("general", True), ("capped", False)):
                answer = stub.Diagnose(pb.DiagnoseRequest(adapter=name, task=task, image=image))
                described = stub.DescribeAdapter(pb.DescribeAdapterRequest(ref=name))
                assert answer.HasField("rank_truncation") is truncated and described.HasField("rank_truncation") is truncated
            t = stub.Diagnose(pb.DiagnoseRequest(adapter="general", task=task, image=image)).rank_truncation
            assert (t.rank, t.served_rank, t.matrices_truncated) == (expected["rank"], CAP, expected["matrices_truncated"])
            assert t.dropped_mass == pytest.approx(expected["dropped_mass"])
    finally:
        srv.stop()


def test_serve_flags_reach_the_engine_settings():
    from medlego.cli import build_parser
    from medlego.cli.serve import config_from_args

    args = build_parser("serve").parse_args(["serve", "--max-rank", "32", "--over-rank", "truncate"])
    cfg = config_from_args(args)
    assert (cfg.engine.max_rank, cfg.engine.over_rank) == (32, "truncate")
    assert ServeConfig().engine.over_rank == "refuse"
