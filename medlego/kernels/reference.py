"""Pure-PyTorch reference for the fused qkv + per-image SVD-LoRA projection.

This is the CPU path of the engine, the training path, and the oracle every Triton kernel is
tested against. Signature shared with the kernels:

    qkv_lora(x, weight, bias, lora_a, lora_e, lora_b, plan) -> y

Semantics:
    y = torch.nn.functional.linear(x, weight, bias)                       # [N, T, 3D]
    for n in range(N):
        s = plan.image_slots[n]
        if s < 0: continue                                               # no adapter
        y[n, :, 0:D]   += ((x[n] @ lora_a[s, 0].T) * lora_e[s, 0]) @ lora_b[s, 0].T   # Q rows
        y[n, :, 2D:3D] += ((x[n] @ lora_a[s, 1].T) * lora_e[s, 1]) @ lora_b[s, 1].T   # V rows
    # K rows [D, 2D) are never touched.

Shapes: x [N, T, D]; weight [3D, D]; bias [3D] or None; lora_a [S, 2, R, D] (index 0 = Q,
1 = V); lora_e [S, 2, R]; lora_b [S, 2, D, R]. Ranks below R are padding with E = 0 (A and B
there hold finite values, e.g. a previous tenant's), which contributes exactly nothing;
``plan.max_rank`` (when > 0) is the largest real rank in the batch, and work above it is skipped.

The projection itself goes through :func:`dense`: ``F.linear`` everywhere, except on the CPU in float32
inference, where oneDNN computes it on a prepacked weight with the bias (and, for an MLP's first Linear,
the GELU) fused into the GEMM (issue 30: MKL's addmm first copies the bias over the whole output, then
GEMMs on top of it). runtime/model.py routes the trunk's other Linears through it too.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .plan import BatchPlan

# -- the dense projection: F.linear, via oneDNN on the CPU --------------------------------------------

_ONEDNN = {"on": torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")}
# weight -> (its version when packed, oneDNN's blocked copy of it): one copy per weight, kept while the weight lives
_PACKED = WeakIdKeyDictionary()
PACK_ROWS = 4096  # the rows-per-GEMM hint of the packing (≥ 256 packs alike; the pack serves any number of rows)


def dense_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    gelu: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ``F.gelu(·, approximate=gelu)`` unless gelu is None."""
    y = F.linear(x, weight, bias)
    return y if gelu is None else F.gelu(y, approximate=gelu)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """oneDNN's linear has no autograd formula and no tracer: only float32 CPU inference, eager."""
    if not _ONEDNN["on"] or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    tracing = torch._C._is_tracing()  # torch.jit.trace (as ONNX export runs it): torch.jit.is_tracing()
    return not (tracing or torch.compiler.is_compiling()) and torch._C._get_mkldnn_enabled()


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
          gelu: str | None = None) -> torch.Tensor:
    """:func:`dense_reference`'s value (float32 rounding aside). On the CPU in float32 inference it is
    one oneDNN linear on the packed weight with the bias and the GELU in the GEMM's epilogue (a
    vit_small batch of 32: ~0.92× → ~1.12× ONNX Runtime's throughput over ``F.linear``); anywhere else
    (a GPU, half precision, autograd, ONNX tracing, torch.compile, whose inductor fuses on its own) it
    is the reference itself."""
    if not _onednn_applies(x, weight, bias):
        return dense_reference(x, weight, bias, gelu)
    w = _packed(weight)
    if gelu is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "gelu", [], gelu)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a weight, made on its first use and again after any in-place write to it
    (its version counter moved: fold → run → unfold baselines do that). Issue 30: against the plain
    weight, which oneDNN reorders on every call, this takes ~7% off a float32 ViT batch on the CPU; it
    costs one more copy of the trunk's Linear weights in memory."""
    if weight.is_inference():  # no version counter to tell a stale copy by
        return weight
    hit = _PACKED.get(weight)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    _PACKED[weight] = (weight._version, packed)
    return packed


@contextmanager
def onednn_linears(enabled: bool):
    """Turn :func:`dense`'s oneDNN path off (or back on) for a while: to time or test the F.linear path."""
    previous = _ONEDNN["on"]
    _ONEDNN["on"] = enabled and previous
    try:
        yield
    finally:
        _ONEDNN["on"] = previous


# -- qkv + per-image SVD-LoRA ----------------------------------------------------------------------------


def qkv_lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor,
                       plan: BatchPlan) -> torch.Tensor:
    y = dense(x, weight, bias)
    if not plan.any_active:
        return y
    n_img, tokens, d = x.shape
    # ranks above the batch's largest adapter rank are zero-padding (E = 0): skip them
    r = min(plan.max_rank, lora_a.shape[2]) if plan.max_rank > 0 else lora_a.shape[2]
    slots = plan.image_slots.to(device=x.device, dtype=torch.int64)
    if plan.all_active:
        idx, xs = slots, x
    else:
        active = torch.nonzero(slots >= 0).flatten()
        idx, xs = slots[active], x[active]
    n = idx.shape[0]
    # One gathered copy of each image's factors (per image, not per token): [n, 2r, D] etc.
    a = lora_a[idx, :, :r].reshape(n, 2 * r, d).to(x.dtype)
    e = lora_e[idx, :, :r].reshape(n, 1, 2 * r).to(x.dtype)
    b = lora_b[idx, :, :, :r].to(x.dtype)  # [n, 2, D, r]
    h = torch.bmm(xs, a.transpose(1, 2)) * e  # [n, T, 2r]: one shrink for Q and V
    if plan.all_active:  # expanded straight into the Q and V columns of the output: no [N, T, D] temporary
        y[..., :d].baddbmm_(h[..., :r], b[:, 0].transpose(1, 2))
        y[..., 2 * d:].baddbmm_(h[..., r:], b[:, 1].transpose(1, 2))
    else:  # K rows untouched; images without an adapter keep the plain projection
        y[..., :d].index_add_(0, active, torch.bmm(h[..., :r], b[:, 0].transpose(1, 2)))
        y[..., 2 * d:].index_add_(0, active, torch.bmm(h[..., r:], b[:, 1].transpose(1, 2)))
    return y


# -- the split path's two low-rank steps (references of kernels/lora_split_triton.py) -------------

def lora_shrink_reference(x2: torch.Tensor, lora_a: torch.Tensor, lora_e: torch.Tensor, plan: BatchPlan, tokens: int,
                          rank: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """``H[n·T + t, j, :] = (x[n, t] · A[s, j, :rank]ᵀ) ⊙ E[s, j, :rank]`` in fp32, s = slot of image n.

    x2 is [N·T, D]; H is [N·T, 2, rank] (j = 0 for Q, 1 for V). Rows of images without an adapter
    are zero here (the kernel leaves them unwritten: the expand step never reads them).
    """
    nt, d = x2.shape
    if h is None:
        h = torch.empty(nt, 2, rank, device=x2.device, dtype=torch.float32)
    h.zero_()
    slots = plan.image_slots.to(torch.int64).cpu().tolist()
    for n, s in enumerate(slots):
        if s < 0:
            continue
        xs = x2[n * tokens:(n + 1) * tokens].float()
        for j in range(2):
            h[n * tokens:(n + 1) * tokens, j] = (xs @ lora_a[s, j, :rank].float().T) * lora_e[s, j, :rank].float()
    return h


def lora_expand_reference(h: torch.Tensor, lora_b: torch.Tensor, plan: BatchPlan, y2: torch.Tensor, tokens: int,
                          rank: int) -> torch.Tensor:
    """``y2[rows of image n, Q cols] += H[·, 0] · B[s, 0]ᵀ`` and likewise V, in place; returns y2 [N·T, 3D]."""
    d = lora_b.shape[2]
    slots = plan.image_slots.to(torch.int64).cpu().tolist()
    for n, s in enumerate(slots):
        if s < 0:
            continue
        rows = slice(n * tokens, (n + 1) * tokens)
        for j, cols in ((0, slice(0, d)), (1, slice(2 * d, 3 * d))):
            delta = h[rows, j, :rank] @ lora_b[s, j, :, :rank].float().T
            y2[rows, cols] = (y2[rows, cols].float() + delta).to(y2.dtype)
    return y2
