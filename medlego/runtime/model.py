"""The base ViT with SVD-LoRA on Q/V: pooled features per image, heads per task, folding.

``AdaptedViT.features(pixels, source)`` runs the frozen trunk once for the whole batch with the
source's per-image low-rank terms; heads are tiny and applied per image by the caller.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapter import Adapter, Head, TaskSpec
from .base import BaseModel
from .lora import AdapterSource, PackedSource, using, wrap_qkv
from .vit import qkv_linear, typed


class AdaptedViT(nn.Module):
    def __init__(self, base: BaseModel):
        super().__init__()
        self.base = base
        self.vit = base.model
        self.state = wrap_qkv(self.vit)

    def features(self, pixels: torch.Tensor, source: AdapterSource | None = None) -> torch.Tensor:
        """Pooled pre-logit features [N, D] of pixels [N, 3, H, W]."""
        with using(self.state, source):
            vit = typed(self.vit)
            return vit.forward_head(vit.forward_features(pixels), pre_logits=True)

    def forward(self, pixels: torch.Tensor, source: AdapterSource | None = None) -> torch.Tensor:
        return self.features(pixels, source)


def head_logits(features: torch.Tensor, head: Head) -> torch.Tensor:
    return torch.nn.functional.linear(features, head.weight.to(features), head.bias.to(features))


def label_probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The one probability rule (serving, evaluation and training alike): a sigmoid per label for a
    multi-label task (its labels are independent), a softmax over the classes otherwise."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)


def probabilities(logits: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """:func:`label_probabilities` for `task`."""
    return label_probabilities(logits, task.multilabel)


@torch.no_grad()
def adapter_logits(model: AdaptedViT, adapter: Adapter, pixels: torch.Tensor, task: str | None = None) -> torch.Tensor:
    """Logits of one adapter on a batch (the simple single-adapter path: CLI predict, eval, tests)."""
    spec = adapter.task(task)
    source = PackedSource.for_adapters([adapter], [0] * pixels.shape[0], dtype=pixels.dtype, device=pixels.device)
    return head_logits(model.features(pixels, source), adapter.heads[spec.name])


def fold_adapter(vit: nn.Module, adapter: Adapter) -> nn.Module:
    """A deep copy of a plain timm ViT with each block's ΔW added to its qkv weight (Q and V rows).

    Used by tests (the oracle for the mixed-batch path), ONNX export and the switch-per-request
    baseline. The original module is not changed.
    """
    folded = copy.deepcopy(vit)
    d = adapter.base.embed_dim
    with torch.no_grad():
        for i, blk in enumerate(typed(folded).blocks):
            w = qkv_linear(blk).weight
            w[:d] += adapter.q[i].delta().to(w)
            w[2 * d:] += adapter.v[i].delta().to(w)
    state = getattr(folded, "_medlego_lora_state", None)
    if state is not None:
        state.source = None
    return folded


def pooled_features(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of a plain (possibly folded) timm ViT."""
    v = typed(vit)
    return v.forward_head(v.forward_features(pixels), pre_logits=True)
