"""The timm Vision Transformer as this project reads it, typed in one place.

timm builds an ``nn.Module`` whose submodules torch's stubs type as ``Tensor | Module``; a checker then
sees ``model.blocks[0].attn.qkv`` as an error. Everything the runtime, the jobs and the export read of
a ViT is declared here as a protocol, and :func:`typed` is the one cast at the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn


class Attention(Protocol):
    qkv: nn.Module  # the fused [3·d, d] Linear, or our LoRA wrapper around it (runtime/lora.py)


class Block(Protocol):
    attn: Attention


class PatchEmbed(Protocol):
    num_patches: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]


class ViT(Protocol):
    blocks: Sequence[Block]
    patch_embed: PatchEmbed
    embed_dim: int
    num_prefix_tokens: int
    pretrained_cfg: dict[str, Any]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def load_pretrained(self, checkpoint_path: str) -> None: ...


def typed(model: nn.Module) -> ViT:
    """The same object, as the ViT protocol (no check at run time: build_model checked the blocks)."""
    return cast(ViT, model)


def create(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` (a heavy import, kept local so that `medlego --help` stays fast)."""
    import timm

    return timm.create_model(name, **kwargs)


def qkv_linear(block: Block) -> nn.Linear:
    """The block's fused qkv Linear itself, under our LoRA wrapper (runtime/lora.py) where one is."""
    qkv = block.attn.qkv
    inner = getattr(qkv, "qkv", None)
    return inner if isinstance(inner, nn.Linear) else cast(nn.Linear, qkv)
