"""Fused Triton kernel: the qkv projection plus per-image SVD-LoRA on Q and V, in one launch.

Semantics (exactly :func:`medlego.kernels.reference.qkv_lora_reference`):
    y = torch.nn.functional.linear(x, weight, bias)                       # [N, T, 3D]
    for n, s in enumerate(plan.image_slots):
        if s < 0: continue
        y[n, :, 0:D]   += ((x[n] @ lora_a[s, 0].T) * lora_e[s, 0]) @ lora_b[s, 0].T
        y[n, :, 2D:3D] += ((x[n] @ lora_a[s, 1].T) * lora_e[s, 1]) @ lora_b[s, 1].T

Design (why it is shaped this way):

* **Adapter-uniform tiles, no padding.** A ViT image is T ≥ 197 tokens that all use one adapter,
  so the M dimension is tiled *per image*: program (m, n) covers rows [t0, t0 + BLOCK_M) of one
  image and therefore reads exactly one slot. Images are visited in the plan's slot-sorted order
  (SGMV-style), so programs that run together share the same A/B tiles in L2. The token matrix is
  never padded or regrouped; the last tile of each image is masked.
* **One K loop for both products.** Each X tile loaded for the base GEMM (X·Wᵀ) is reused at once
  for X·Aᵀ ([BLOCK_M, R] accumulator, R padded to ≥ 16 for tl.dot; the padded ranks have E = 0 and
  zero A rows), so the low-rank part costs no extra pass over X. After the loop the rank-R
  accumulator is scaled by E and multiplied by the B tile of this program's columns.
* **Column tiles never straddle Q/K/V.** BLOCK_N divides D, so a program's columns are all Q, all K
  or all V: K programs and images with slot −1 skip the LoRA loads entirely (a scalar branch),
  and no per-image ΔW or per-token copy of A or B is ever made.
* fp32 accumulation for bf16/fp16/fp32 inputs; fp32 uses IEEE dots (no TF32) so it matches the
  reference within 1e-4. When no image in the batch has an adapter the wrapper returns F.linear.

Measured effect: not measured on a GPU yet (the session that wrote this had none); the CPU tests
run it under TRITON_INTERPRET=1. ``python -m medlego.benchmarks.kernel_bench`` measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .plan import BatchPlan

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _qkv_lora_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, e_ptr, b_ptr, y_ptr, slots_ptr, order_ptr,
    T, D, N3,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    stride_as, stride_aj, stride_ar, stride_ak,
    stride_es, stride_ej, stride_er,
    stride_bs, stride_bj, stride_bd, stride_br,
    R,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_image = tl.cdiv(T, BLOCK_M)
    img = tl.load(order_ptr + pid_m // tiles_per_image)  # slot-sorted image order
    t0 = (pid_m % tiles_per_image) * BLOCK_M
    offs_t = t0 + tl.arange(0, BLOCK_M)
    row_ok = offs_t < T
    rows = img * T + offs_t
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N3
    target = col0 // D  # 0 = Q, 1 = K, 2 = V (BLOCK_N divides D)
    slot = tl.load(slots_ptr + img)
    use_lora = (slot >= 0) & (target != 1)
    j = target // 2  # 0 for Q, 1 for V
    slot_safe = tl.maximum(slot, 0)

    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    a_base = a_ptr + slot_safe * stride_as + j * stride_aj
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < D
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if FP32_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
        if use_lora:
            a_t = tl.load(a_base + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
                          mask=(offs_r[None, :] < R) & k_ok[:, None], other=0.0)  # Aᵀ tile [BK, R_PAD]
            if FP32_DOT:
                xa += tl.dot(x, a_t, input_precision="ieee")
            else:
                xa += tl.dot(x, a_t)
    if use_lora:
        e = tl.load(e_ptr + slot_safe * stride_es + j * stride_ej + offs_r * stride_er, mask=offs_r < R, other=0.0)
        xa = xa * e.to(tl.float32)[None, :]
        d_rows = cols - target * D  # this program's rows of B (its output features)
        b_t = tl.load(b_ptr + slot_safe * stride_bs + j * stride_bj + d_rows[None, :] * stride_bd
                      + offs_r[:, None] * stride_br,
                      mask=(offs_r[:, None] < R) & col_ok[None, :], other=0.0)  # Bᵀ tile [R_PAD, BN]
        if FP32_DOT:
            acc += tl.dot(xa, b_t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xa.to(b_t.dtype), b_t)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _pow2_divisor(d: int, cap: int) -> int:
    b = cap
    while b > 16 and d % b:
        b //= 2
    return b


def pick_config(d: int, tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes per shape: a small table (interpreter: small tiles keep the CPU run quick)."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": _pow2_divisor(d, 32), "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}
    big = tokens >= 64
    return {"BLOCK_M": 64 if big else 16, "BLOCK_N": _pow2_divisor(d, 128), "BLOCK_K": 64 if dtype != torch.float32 else 32,
            "num_warps": 4 if big else 2, "num_stages": 3}


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of x)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension")


def check_qkv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_e: torch.Tensor, lora_b: torch.Tensor, plan: BatchPlan) -> tuple[int, int, int]:
    """One-line ValueErrors for what the Triton paths cannot take; returns (N, T, D)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [N, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    n, t, d = x.shape
    dev = x.device
    if d % 16:
        raise ValueError(f"embedding dim {d} must be a multiple of 16 for the Triton kernels")
    _check("weight", weight, (3 * d, d), x.dtype, dev)
    if bias is not None:
        _check("bias", bias, (3 * d,), x.dtype, dev)
    s, two, r, d_a = lora_a.shape
    if two != 2 or d_a != d:
        raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}, expected [S, 2, R, {d}]")
    _check("lora_e", lora_e, (s, 2, r), x.dtype, dev)
    _check("lora_b", lora_b, (s, 2, d, r), x.dtype, dev)
    _check("lora_a", lora_a, (s, 2, r, d), x.dtype, dev)
    if plan.image_slots.shape != (n,):
        raise ValueError(f"plan has {plan.image_slots.shape[0]} images, x has {n}")
    if plan.image_slots.device != dev or plan.order.device != dev:
        raise ValueError(f"plan is on {plan.image_slots.device}, x on {dev}")
    return n, t, d


def qkv_lora_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_e: torch.Tensor, lora_b: torch.Tensor, plan: BatchPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``x·Wᵀ + b`` + per-image SVD-LoRA on Q/V (see the module docstring for the semantics)."""
    n, t, d = check_qkv_args(x, weight, bias, lora_a, lora_e, lora_b, plan)
    dev = x.device
    r = lora_a.shape[2]
    if not plan.any_active:  # nothing to add: the plain projection is the answer
        y = F.linear(x, weight, bias)
        return out.copy_(y) if out is not None else y
    x2 = x.reshape(n * t, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty(n, t, 3 * d, device=dev, dtype=x.dtype)
    if tuple(y.shape) != (n, t, 3 * d) or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {t}, {3 * d}] tensor")
    y2 = y.view(n * t, 3 * d)
    cfg = pick_config(d, t, x.dtype, dev)
    r = min(plan.max_rank, r) if plan.max_rank > 0 else r  # ranks above the batch's largest are E = 0 padding
    r_pad = max(16, triton.next_power_of_2(r))
    grid = (n * triton.cdiv(t, cfg["BLOCK_M"]), triton.cdiv(3 * d, cfg["BLOCK_N"]))
    _qkv_lora_kernel[grid](
        x2, weight, bias if bias is not None else weight, lora_a, lora_e, lora_b, y2, plan.image_slots, plan.order,
        t, d, 3 * d,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y2.stride(0), y2.stride(1),
        *lora_a.stride(), *lora_e.stride(), *lora_b.stride(),
        r,
        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        R_PAD=r_pad, FP32_DOT=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
