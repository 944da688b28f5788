"""A summary of an adapter for `medlego inspect`: tasks, ranks, size and share of the base."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .adapter import Adapter
from .vit import create


def base_param_count(model_name: str, img_size: int | None = None) -> int:
    """Parameters of the base backbone (classifier excluded), built on the meta device: no weights."""
    kwargs = {"img_size": img_size} if img_size else {}
    with torch.device("meta"):
        m = create(model_name, pretrained=False, num_classes=0, **kwargs)
    return sum(p.numel() for p in m.parameters())


def summarize(adapter: Adapter, path: str | Path | None = None, sha256: str | None = None) -> dict:
    ranks = adapter.ranks()
    base_params = base_param_count(adapter.base.model, adapter.preprocess.input_size)
    hist = Counter(ranks.values())
    return {
        "path": str(path) if path else None,
        "sha256": sha256,
        "file_bytes": Path(path).stat().st_size if path else None,
        "base": adapter.base.to_json(),
        "tasks": [t.to_json() for t in adapter.tasks],
        "ranks": {"min": min(ranks.values()), "max": max(ranks.values()),
                  "histogram": {str(k): v for k, v in sorted(hist.items())}, "per_matrix": ranks},
        "lora_params": adapter.lora_params,
        "lora_params_E": sum(m.E.numel() for _, _, m in adapter.matrices()),
        "head_params": adapter.head_params,
        "base_params": base_params,
        "lora_share_of_base": adapter.lora_params / base_params,
        "preprocess": adapter.preprocess.to_json(),
        "provenance": dict(adapter.provenance),
        "created": adapter.created,
    }
