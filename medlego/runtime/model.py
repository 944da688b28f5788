"""The base ViT with SVD-LoRA on Q/V: pooled features per image, heads per task, folding.

``AdaptedViT.features(pixels, source)`` runs the frozen trunk once for the whole batch with the
source's per-image low-rank terms; heads are tiny and applied per image by the caller. The trunk's
Linears compute through :func:`medlego.kernels.reference.dense` (:func:`use_dense_linears`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medlego.kernels.reference import dense

from .adapter import Adapter, Head, TaskSpec
from .base import BaseModel
from .lora import AdapterSource, PackedSource, using, wrap_qkv
from .vit import qkv_linear, typed


class DenseLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state_dict) whose forward is :func:`dense`, with the GELU
    that follows it in its MLP fused in when ``gelu`` names one: oneDNN in float32 CPU inference,
    ``F.linear`` (then ``F.gelu``) elsewhere, in training and when traced for ONNX."""

    gelu: str | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (nn.Linear's own name)
        return dense(input, self.weight, self.bias, self.gelu)


def _to_dense(linear: nn.Module | None, gelu: str | None = None) -> None:
    if type(linear) is nn.Linear:  # exactly: a subclass may compute something else
        linear.__class__ = DenseLinear  # the same object and parameters: folding and export see a Linear
        linear.gelu = gelu  # type: ignore[attr-defined]


def _fusable_gelu(mlp: nn.Module) -> str | None:
    """The GELU form of a timm ``Mlp`` (fc1 → act → drop1 → norm → fc2 → drop2) whose act can move into
    fc1, else None (a GLU or SwiGLU MLP, another activation, a norm between them)."""
    act, norm = getattr(mlp, "act", None), getattr(mlp, "norm", None)
    if type(mlp).__name__ != "Mlp" or type(act) is not nn.GELU or not isinstance(norm, nn.Identity):
        return None
    return act.approximate


def use_dense_linears(vit: nn.Module) -> None:
    """Make every block's plain Linears (qkv, proj, fc1 with its GELU, fc2) :class:`DenseLinear`, in place
    (idempotent). Issue 30: on the CPU a float32 batch runs ~20% faster than on ``F.linear`` (oneDNN on
    packed weights, bias and GELU fused); on a GPU, in training and in ONNX export nothing changes."""
    for blk in typed(vit).blocks:
        _to_dense(qkv_linear(blk))
        _to_dense(getattr(blk.attn, "proj", None))
        mlp = getattr(blk, "mlp", None)
        if mlp is None:
            continue
        gelu = _fusable_gelu(mlp)
        if gelu is not None and type(getattr(mlp, "fc1", None)) is nn.Linear:
            _to_dense(mlp.fc1, gelu)
            mlp.act = nn.Identity()  # now inside fc1
        _to_dense(getattr(mlp, "fc1", None))
        _to_dense(getattr(mlp, "fc2", None))


class AdaptedViT(nn.Module):
    def __init__(self, base: BaseModel):
        super().__init__()
        self.base = base
        self.vit = base.model
        self.state = wrap_qkv(self.vit)
        use_dense_linears(self.vit)

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
