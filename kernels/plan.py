"""Per-batch adapter metadata, built once per batch and shared by every adapted layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    """Which pool slot each image of the batch uses (−1 = no adapter).

    The sorted order is what an SGMV-style kernel wants (neighbouring tiles share one adapter's
    factors in cache); the reference only needs ``image_slots``.
    """

    image_slots: torch.Tensor  # [N] int32, on the device of the activations
    order: torch.Tensor  # [N] int64: images sorted by slot (stable)
    num_active: int  # images with a slot >= 0
    max_rank: int  # the largest real adapter rank in this batch (0: use the bank's whole R)

    @property
    def batch(self) -> int:
        return int(self.image_slots.shape[0])

    @property
    def any_active(self) -> bool:
        return self.num_active > 0

    @property
    def all_active(self) -> bool:
        return self.num_active == self.batch

    @staticmethod
    def build(image_slots, *, device: torch.device | str | None = None, max_rank: int = 0) -> "BatchPlan":
        slots = torch.as_tensor(image_slots, dtype=torch.int64).flatten().cpu()
        order = torch.argsort(slots, stable=True)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return BatchPlan(
            image_slots=slots.to(device=dev, dtype=torch.int32),
            order=order.to(dev),
            num_active=int((slots >= 0).sum()),
            max_rank=int(max_rank),
        )
