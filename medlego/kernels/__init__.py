"""Kernels for ``Y = X·Wᵀ + b`` plus per-image SVD-LoRA on the Q and V columns.

Every implementation shares the signature of :func:`medlego.kernels.reference.qkv_lora_reference`
(its docstring holds the semantics). :func:`get_qkv_impl` picks one by name.
"""

from __future__ import annotations

from typing import Callable

from .plan import BatchPlan
from .reference import qkv_lora_reference

IMPLS = ("torch", "fused", "split")
ALIASES = {"triton": "fused"}  # the fused kernel's first name


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def get_qkv_impl(name: str = "auto", device: str = "cpu") -> Callable:
    """'torch' (reference), 'fused' (one Triton launch), 'split' (cuBLAS + Triton shrink/expand), or
    'auto': the fused kernel on CUDA when Triton imports, else the reference. (The engine does its
    own 'auto': it measures the paths per shape, runtime/kernel_choice.py.)"""
    name = ALIASES.get(name, name)
    if name == "auto":
        name = "fused" if str(device).startswith("cuda") and triton_available() else "torch"
    if name == "torch":
        return qkv_lora_reference
    if name == "fused":
        from .qkv_lora_triton import qkv_lora_triton

        return qkv_lora_triton
    if name == "split":
        from .lora_split_triton import qkv_lora_split

        return qkv_lora_split
    raise ValueError(f"unknown kernel '{name}' (choose from auto, {', '.join(IMPLS)})")


def impl_name(fn: Callable) -> str:
    """The --kernel name of an implementation."""
    return {"qkv_lora_reference": "torch", "qkv_lora_triton": "fused", "qkv_lora_split": "split"}.get(
        getattr(fn, "__name__", ""), getattr(fn, "__name__", str(fn)))


__all__ = ["BatchPlan", "IMPLS", "qkv_lora_reference", "get_qkv_impl", "impl_name", "triton_available"]
