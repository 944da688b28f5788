"""The split path: cuBLAS for ``X·Wᵀ + b``, then SGMV-style Triton kernels for the low-rank part.

Semantics: exactly :func:`medlego.kernels.reference.qkv_lora_reference` (same signature).

Why a second path beside the fused kernel: a hand-written Triton GEMM rarely matches cuBLAS on a
Hopper GPU, and the LoRA terms are ~0.2 % of a ViT's FLOPs. So the base projection may be better
left to ``F.linear`` with only the rank-R work in Triton, at the price of one extra read of X and
one read-modify-write of the Q and V columns of Y. Which path wins depends on the GPU and the
shape; the engine measures both (runtime/kernel_choice.py) and keeps the faster.

* **shrink**: ``H[n, t, j, :] = (X[n, t] · A[s, j]ᵀ) ⊙ E[s, j]`` for j ∈ {Q, V}, in fp32. One program
  covers BLOCK_M tokens of one image (so it reads one slot's A), loads each X tile once and feeds
  both the Q and the V dot. Images run in the plan's slot-sorted order, so neighbouring programs
  share A in L2.
* **expand**: ``Y[n, t, cols(j)] += H[n, t, j, :] · B[s, j]ᵀ``, in place in the projection's output;
  K columns are never touched. Images with slot −1 exit at once in both kernels (no branch on the
  host, so a CUDA graph captured once serves any mix of adapters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .plan import BatchPlan
from .qkv_lora_triton import check_qkv_args


@triton.jit
def _image_tile(order_ptr, slots_ptr, T, BLOCK_M: tl.constexpr):
    """This program's image (slot-sorted order), its slot, and its BLOCK_M rows of that image."""
    pid_m = tl.program_id(0)
    tiles_per_image = tl.cdiv(T, BLOCK_M)
    img = tl.load(order_ptr + pid_m // tiles_per_image)
    slot = tl.load(slots_ptr + img)
    offs_t = (pid_m % tiles_per_image) * BLOCK_M + tl.arange(0, BLOCK_M)
    return slot, img * T + offs_t, offs_t < T


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, e_ptr, h_ptr, slots_ptr, order_ptr,
    T, D,
    stride_xm, stride_xk,
    stride_as, stride_aj, stride_ar, stride_ak,
    stride_es, stride_ej, stride_er,
    stride_hm, stride_hj, stride_hr,
    R,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, FP32_DOT: tl.constexpr,
):
    slot, rows, row_ok = _image_tile(order_ptr, slots_ptr, T, BLOCK_M)
    if slot < 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    a_q = a_ptr + slot * stride_as
    a_v = a_q + stride_aj
    hq = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    hv = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < D
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_mask = r_ok[None, :] & k_ok[:, None]
        aq = tl.load(a_q + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak, mask=a_mask, other=0.0)
        av = tl.load(a_v + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak, mask=a_mask, other=0.0)
        if FP32_DOT:
            hq += tl.dot(x, aq, input_precision="ieee")
            hv += tl.dot(x, av, input_precision="ieee")
        else:
            hq += tl.dot(x, aq)
            hv += tl.dot(x, av)
    e_base = e_ptr + slot * stride_es + offs_r * stride_er
    eq = tl.load(e_base, mask=r_ok, other=0.0).to(tl.float32)
    ev = tl.load(e_base + stride_ej, mask=r_ok, other=0.0).to(tl.float32)
    h_base = h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr
    h_mask = row_ok[:, None] & r_ok[None, :]
    tl.store(h_base, hq * eq[None, :], mask=h_mask)
    tl.store(h_base + stride_hj, hv * ev[None, :], mask=h_mask)


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, y_ptr, slots_ptr, order_ptr,
    T, D,
    stride_hm, stride_hj, stride_hr,
    stride_bs, stride_bj, stride_bd, stride_br,
    stride_ym, stride_yn,
    R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_n = tl.program_id(1)
    j = tl.program_id(2)  # 0 = Q, 1 = V
    slot, rows, row_ok = _image_tile(order_ptr, slots_ptr, T, BLOCK_M)
    if slot < 0:
        return
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    h = tl.load(h_ptr + rows[:, None] * stride_hm + j * stride_hj + offs_r[None, :] * stride_hr,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, R_PAD] fp32
    b_t = tl.load(b_ptr + slot * stride_bs + j * stride_bj + offs_d[None, :] * stride_bd + offs_r[:, None] * stride_br,
                  mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # Bᵀ tile [R_PAD, BN]
    if FP32_DOT:
        delta = tl.dot(h, b_t.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(h.to(b_t.dtype), b_t)
    cols = j * 2 * D + offs_d  # Q columns [0, D), V columns [2D, 3D)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = row_ok[:, None] & d_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


def pick_split_config(d: int, tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles of the two low-rank kernels (small on the interpreter, where only correctness counts)."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32, "num_warps": 1}
    return {"BLOCK_M": 64 if tokens >= 64 else 16, "BLOCK_K": 64, "BLOCK_N": 128, "num_warps": 4}


def lora_shrink_triton(x2: torch.Tensor, lora_a: torch.Tensor, lora_e: torch.Tensor, plan: BatchPlan, tokens: int,
                       rank: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """H [N·T, 2, rank] fp32 (rows of images without an adapter are left unwritten)."""
    nt, d = x2.shape
    if h is None:
        h = torch.empty(nt, 2, rank, device=x2.device, dtype=torch.float32)
    cfg = pick_split_config(d, tokens, x2.dtype, x2.device)
    n = nt // tokens
    grid = (n * triton.cdiv(tokens, cfg["BLOCK_M"]),)
    _shrink_kernel[grid](
        x2, lora_a, lora_e, h, plan.image_slots, plan.order, tokens, d,
        x2.stride(0), x2.stride(1), *lora_a.stride(), *lora_e.stride(), *h.stride(), rank,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], R_PAD=max(16, triton.next_power_of_2(rank)),
        FP32_DOT=x2.dtype == torch.float32, num_warps=cfg["num_warps"],
    )
    return h


def lora_expand_triton(h: torch.Tensor, lora_b: torch.Tensor, plan: BatchPlan, y2: torch.Tensor, tokens: int,
                       rank: int) -> torch.Tensor:
    """``y2[:, Q and V columns] += H · Bᵀ`` in place, for the images with an adapter; returns y2."""
    d = lora_b.shape[2]
    cfg = pick_split_config(d, tokens, y2.dtype, y2.device)
    n = y2.shape[0] // tokens
    grid = (n * triton.cdiv(tokens, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_N"]), 2)
    _expand_kernel[grid](
        h, lora_b, y2, plan.image_slots, plan.order, tokens, d,
        *h.stride(), *lora_b.stride(), y2.stride(0), y2.stride(1), rank,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], R_PAD=max(16, triton.next_power_of_2(rank)),
        FP32_DOT=y2.dtype == torch.float32, num_warps=cfg["num_warps"],
    )
    return y2


def qkv_lora_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_e: torch.Tensor, lora_b: torch.Tensor, plan: BatchPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (cuBLAS) + shrink + expand: the same result as the fused kernel, in three launches."""
    n, t, d = check_qkv_args(x, weight, bias, lora_a, lora_e, lora_b, plan)
    x2 = x.reshape(n * t, d)
    if out is None:
        y2 = F.linear(x2, weight, bias)
    else:
        if tuple(out.shape) != (n, t, 3 * d) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous [{n}, {t}, {3 * d}] tensor")
        y2 = out.view(n * t, 3 * d)
        if bias is None:
            torch.mm(x2, weight.t(), out=y2)
        else:
            torch.addmm(bias, x2, weight.t(), out=y2)
    if plan.any_active:
        r = min(plan.max_rank, lora_a.shape[2]) if plan.max_rank > 0 else lora_a.shape[2]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        h = lora_shrink_triton(x2, lora_a, lora_e, plan, t, r)
        lora_expand_triton(h, lora_b, plan, y2, t, r)
    return y2.view(n, t, 3 * d)
