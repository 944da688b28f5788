"""Kernels for ``Y = X·Wᵀ + b`` plus per-image SVD-LoRA on the Q and V columns.

Every implementation shares the signature of :func:`medlego.kernels.reference.qkv_lora_reference`
(its docstring holds the semantics). :func:`get_qkv_impl` picks one by name.
"""

from __future__ import annotations

from typing import Callable

from .plan import BatchPlan
from .reference import qkv_lora_reference

IMPLS = ("torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def get_qkv_impl(name: str = "auto", device: str = "cpu") -> Callable:
    """'torch' (reference), 'triton' (fused kernel), or 'auto' (triton on CUDA when importable)."""
    if name == "auto":
        name = "triton" if str(device).startswith("cuda") and triton_available() else "torch"
    if name == "torch":
        return qkv_lora_reference
    if name == "triton":
        from .qkv_lora_triton import qkv_lora_triton

        return qkv_lora_triton
    raise ValueError(f"unknown kernel '{name}' (choose from auto, {', '.join(IMPLS)})")


__all__ = ["BatchPlan", "qkv_lora_reference", "get_qkv_impl", "triton_available"]
