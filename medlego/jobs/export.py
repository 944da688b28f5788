"""ONNX export of one task: the base with one adapter folded into its qkv weights, plus that task's head.

Input ``pixel_values`` [N, 3, H, W] float32, normalised as the adapter's ``preprocess`` says;
output ``logits`` [N, classes]; the batch dimension is dynamic. The adapter's preprocessing,
labels and identity go into the model's metadata_props so a hospital's runtime knows them.
The file is checked with onnxruntime against the PyTorch engine path before it is written
(into a temp file, renamed only when it agrees): a disagreeing model is never left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medlego.runtime.adapter import Adapter, current_umask
from medlego.runtime.base import BaseModel
from medlego.runtime.vit import qkv_linear, typed
from medlego.runtime.errors import BadInputError, ExportError
from medlego.runtime.model import AdaptedViT, adapter_logits, fold_adapter


class _OneTask(nn.Module):
    def __init__(self, vit: nn.Module, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.vit = vit
        self.register_buffer("head_weight", weight.detach().clone().float())
        self.register_buffer("head_bias", bias.detach().clone().float())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit = typed(self.vit)
        feats = vit.forward_head(vit.forward_features(pixel_values), pre_logits=True)
        return F.linear(feats, self.head_weight, self.head_bias)


def _unwrap_qkv(vit: nn.Module) -> nn.Module:
    """Replace LoRA wrappers by their plain Linear (the update is already folded in)."""
    for blk in typed(vit).blocks:
        blk.attn.qkv = qkv_linear(blk)  # the same Linear where it was not wrapped
    if hasattr(vit, "_medlego_lora_state"):
        del vit._medlego_lora_state
    return vit


def export_onnx(base: BaseModel, adapter: Adapter, task: str | None, out: str | Path, *, opset: int = 17,
                tolerance: float = 1e-4, check_batch: int = 3, seed: int = 0) -> dict:
    """Export, verify with onnxruntime, then write. Returns {"path", "max_abs_diff", "classes", ...}."""
    import onnx
    import onnxruntime as ort

    if tolerance <= 0:
        raise BadInputError("tolerance must be positive")
    spec = adapter.task(task)
    folded = _unwrap_qkv(fold_adapter(base.model, adapter)).float().eval()
    head = adapter.heads[spec.name]
    module = _OneTask(folded, head.weight, head.bias).eval()
    s = base.input_size
    dummy = torch.zeros(2, 3, s, s)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (dummy,), tmp, input_names=["pixel_values"], output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        model = onnx.load(tmp)
        meta = {"medlego.format": "medlego.onnx-task/1", "medlego.task": spec.name,
                "medlego.labels": json.dumps(list(spec.labels)), "medlego.multilabel": json.dumps(spec.multilabel),
                "medlego.preprocess": json.dumps(adapter.preprocess.to_json()),
                "medlego.base": json.dumps(adapter.base.to_json()),
                "medlego.adapter_provenance": json.dumps(dict(adapter.provenance), default=str)[:65536]}
        for k, v in meta.items():
            p = model.metadata_props.add()
            p.key, p.value = k, v
        onnx.save(model, tmp)
        # check: the PyTorch engine path (mixed-batch SVD-LoRA, not the folded copy) vs onnxruntime
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(check_batch, 3, s, s, generator=g)
        expected = adapter_logits(AdaptedViT(base), adapter, x, spec.name).numpy()
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"pixel_values": x.numpy()})[0]
        single = sess.run(["logits"], {"pixel_values": x[:1].numpy()})[0]
        diff = float(max(abs(got - expected).max(), abs(single - expected[:1]).max()))
        if not diff <= tolerance:
            raise ExportError(f"ONNX output differs from the engine by {diff:.3g} (tolerance {tolerance:g}); nothing written")
        os.chmod(tmp, 0o666 & ~current_umask())  # as the user's other files: mkstemp made it 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(out), "task": spec.name, "classes": spec.num_classes, "input_size": s,
            "max_abs_diff": diff, "opset": opset, "bytes": out.stat().st_size}
