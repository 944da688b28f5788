"""The baselines our engine is compared with, built on equivalent adapters.

* PEFT's mixed-batch forward (``adapter_names=``): one LoRA per adapter on timm's fused qkv with
  rank 2r: lora_A = [A_q; A_v], lora_B = [[B_q·E_q, 0], [0, 0], [0, B_v·E_v]], scaling 1 — the
  same function as our SVD-LoRA on Q and V (checked before timing).
* "switch per request": fold the request's ΔW into the qkv weights, run that one image, fold it
  back out — how single-adapter systems (MeLo's reference code, merged-weight serving) swap.
* ONNX Runtime on one adapter folded into an exported model (``medlego export``): what a CPU user
  who serves a single task would deploy instead of our engine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from medlego.runtime.adapter import Adapter
from medlego.runtime.base import BaseModel
from medlego.runtime.model import pooled_features


def peft_model(vit: nn.Module, adapters: list[Adapter]):
    """A PeftModel over a copy of the plain timm ViT with one equivalent LoRA per adapter (names a0, a1, …)."""
    import peft

    base = copy.deepcopy(vit)
    for blk in base.blocks:  # strip our wrappers: PEFT targets the plain Linear
        if hasattr(blk.attn.qkv, "qkv") and isinstance(blk.attn.qkv.qkv, nn.Linear):
            blk.attn.qkv = blk.attn.qkv.qkv
    r = 2 * max(a.max_rank for a in adapters)
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["qkv"])
    pm = peft.get_peft_model(base, cfg, adapter_name="a0")
    for k in range(1, len(adapters)):
        pm.add_adapter(f"a{k}", cfg)
    d = adapters[0].base.embed_dim
    modules = {name[name.index("blocks"):]: m for name, m in pm.named_modules()
               if name.endswith("attn.qkv") and hasattr(m, "lora_A")}
    with torch.no_grad():
        for k, ad in enumerate(adapters):
            for i in range(ad.depth):
                q, v = ad.q[i], ad.v[i]
                a = torch.zeros(r, d)
                b = torch.zeros(3 * d, r)
                a[:q.rank] = q.A
                a[r // 2:r // 2 + v.rank] = v.A
                b[:d, :q.rank] = q.B * q.E
                b[2 * d:, r // 2:r // 2 + v.rank] = v.B * v.E
                mod = modules[f"blocks.{i}.attn.qkv"]
                mod.lora_A[f"a{k}"].weight.copy_(a)
                mod.lora_B[f"a{k}"].weight.copy_(b)
    return pm.eval()


class SwitchPerRequest:
    """Fold → run one image → unfold, per request."""

    def __init__(self, vit: nn.Module):
        self.vit = copy.deepcopy(vit)
        self.linears = []
        for blk in self.vit.blocks:
            qkv = blk.attn.qkv
            self.linears.append(qkv.qkv if hasattr(qkv, "qkv") and isinstance(qkv.qkv, nn.Linear) else qkv)
        if hasattr(self.vit, "_medlego_lora_state"):
            self.vit._medlego_lora_state.source = None

    @torch.no_grad()
    def _fold(self, ad: Adapter, sign: float) -> None:
        d = ad.base.embed_dim
        for i, lin in enumerate(self.linears):
            w = lin.weight
            w[:d].add_(ad.q[i].delta().to(w), alpha=sign)
            w[2 * d:].add_(ad.v[i].delta().to(w), alpha=sign)

    @torch.no_grad()
    def run(self, images: torch.Tensor, adapters: list[Adapter]) -> list[torch.Tensor]:
        out = []
        for x, ad in zip(images, adapters):
            self._fold(ad, 1.0)
            try:
                feats = pooled_features(self.vit, x.unsqueeze(0))
            finally:
                self._fold(ad, -1.0)
            h = ad.heads[ad.tasks[0].name]
            out.append(torch.nn.functional.linear(feats, h.weight, h.bias))
        return out


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OrtFolded:
    """One adapter folded into the base, exported with ``medlego export`` (checked against the engine
    there) and run by ONNX Runtime's CPU provider with as many threads as torch uses."""

    def __init__(self, base: BaseModel, adapter: Adapter, workdir: Path):
        import onnxruntime as ort

        from medlego.jobs.export import export_onnx

        path = export_onnx(base, adapter, None, Path(workdir) / "folded.onnx")["path"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(self, images: torch.Tensor):
        return self.session.run(["logits"], {"pixel_values": images.float().numpy()})[0]
