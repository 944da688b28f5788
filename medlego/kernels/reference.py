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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import BatchPlan


def qkv_lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor,
                       plan: BatchPlan) -> torch.Tensor:
    y = F.linear(x, weight, bias)
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
    h = torch.bmm(xs, a.transpose(1, 2)) * e  # [n, T, 2r]
    dq = torch.bmm(h[..., :r], b[:, 0].transpose(1, 2))  # [n, T, D]
    dv = torch.bmm(h[..., r:], b[:, 1].transpose(1, 2))
    # added in place into the projection's output (K rows untouched): no [N, T, 3D] temporary
    if plan.all_active:
        y[..., :d] += dq
        y[..., 2 * d:] += dv
    else:
        y[..., :d].index_add_(0, active, dq)
        y[..., 2 * d:].index_add_(0, active, dv)
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
