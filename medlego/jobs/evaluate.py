"""Metrics of any adapter (trained or merged, any of its tasks) on any dataset split."""

from __future__ import annotations

import torch

from medlego.runtime.adapter import Adapter
from medlego.runtime.base import BaseModel
from medlego.runtime.errors import BadInputError
from medlego.runtime.model import AdaptedViT, adapter_logits, probabilities

from .datasets import Dataset, normalise
from .metrics import metrics_for


@torch.no_grad()
def predict_probs(base: BaseModel, adapter: Adapter, images: torch.Tensor, task: str | None = None,
                  batch_size: int = 128, model: AdaptedViT | None = None) -> torch.Tensor:
    """Probabilities [N, C] for images [N, 3, S, S] in [0, 1] (normalised here by the adapter's preprocess)."""
    spec = adapter.task(task)
    model = model or AdaptedViT(base)
    out = []
    for i in range(0, len(images), batch_size):
        x = normalise(images[i:i + batch_size], adapter.preprocess)
        out.append(probabilities(adapter_logits(model, adapter, x, spec.name), spec))
    return torch.cat(out) if out else torch.zeros(0, spec.num_classes)


def evaluate_adapter(base: BaseModel, adapter: Adapter, data: Dataset, task: str | None = None,
                     split: str = "test", model: AdaptedViT | None = None) -> dict:
    spec = adapter.task(task)
    if spec.num_classes != data.num_classes or spec.multilabel != data.multilabel:
        raise BadInputError(f"task '{spec.name}' has {spec.num_classes} {'multi-label ' if spec.multilabel else ''}"
                            f"classes but the dataset has {data.num_classes}{' (multi-label)' if data.multilabel else ''}")
    s = data.split(split)
    probs = predict_probs(base, adapter, s.images, spec.name, model=model)
    m = metrics_for(probs, s.labels, data.multilabel)
    return {"task": spec.name, "split": split, "dataset": data.name, **m}


def evaluate_on(base: BaseModel, adapter: Adapter, data_path, task: str | None = None, split: str = "test",
                seed: int = 0, model: AdaptedViT | None = None) -> dict:
    """`medlego eval`: the adapter's metrics on a dataset file or folder, loaded as eval loads it (the demo
    reports exactly this, so its numbers are eval's)."""
    from .datasets import load_dataset

    spec = adapter.task(task)
    data = load_dataset(data_path, input_size=base.input_size, seed=seed,
                        label_names=list(spec.labels) if not spec.multilabel else None, num_classes=spec.num_classes)
    return evaluate_adapter(base, adapter, data, spec.name, split, model=model)
