"""ONNX export: matches the engine path (< 1e-4) at any batch size, carries metadata, refuses on mismatch."""

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from medlego.jobs.export import export_onnx
from medlego.runtime.errors import ExportError
from medlego.runtime.adapter import TaskSpec
from medlego.runtime.model import AdaptedViT, adapter_logits


def test_export_round_trip(tmp_path, tiny_base, make_adapter):
    ad = make_adapter(seed=3, rank=[1 + i % 5 for i in range(2 * tiny_base.depth)],
                      tasks=[TaskSpec("blood", tuple("abcdefgh")), TaskSpec("chest", tuple("xyz"), True)])
    out = tmp_path / "chest.onnx"
    info = export_onnx(tiny_base, ad, "chest", out)
    assert info["max_abs_diff"] < 1e-4 and info["classes"] == 3
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"] and [o.name for o in sess.get_outputs()] == ["logits"]
    model = AdaptedViT(tiny_base)
    for n in (1, 3, 5):  # dynamic batch
        x = torch.randn(n, 3, 32, 32)
        got = sess.run(["logits"], {"pixel_values": x.numpy()})[0]
        assert got.shape == (n, 3)
        assert abs(got - adapter_logits(model, ad, x, "chest").numpy()).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["medlego.labels"]) == ["x", "y", "z"] and json.loads(meta["medlego.multilabel"]) is True
    assert json.loads(meta["medlego.preprocess"])["input_size"] == 32


def test_export_refuses_to_write_a_disagreeing_model(tmp_path, tiny_base, make_adapter):
    out = tmp_path / "x.onnx"
    # float32 ONNX vs the engine differ by ~1e-6; a tolerance far below that must refuse
    with pytest.raises(ExportError, match="differs from the engine by .* nothing written"):
        export_onnx(tiny_base, make_adapter(seed=1), None, out, tolerance=1e-12)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp file left either
