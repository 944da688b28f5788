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


class PlanBuffers:
    """The plan's device tensors, preallocated once at fixed addresses and refilled per batch.

    Two reasons: the hot path allocates nothing per batch (only ``copy_`` from a staging buffer, as
    vLLM fills its LoRA indices), and a CUDA graph captured on these views stays valid for any mix
    of adapters — a replay reads whatever the buffers hold now.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.slots = torch.full((self.capacity,), -1, dtype=torch.int32, device=self.device)
        self.order = torch.arange(self.capacity, dtype=torch.int64, device=self.device)
        self._host_slots = torch.empty(self.capacity, dtype=torch.int32, pin_memory=cuda)
        self._host_order = torch.empty(self.capacity, dtype=torch.int64, pin_memory=cuda)
        # the staging buffers are read by an asynchronous copy: never rewrite them before it ran
        self._copied = torch.cuda.Event() if cuda else None

    def fill(self, image_slots: list[int], *, pad_to: int | None = None, max_rank: int = 0) -> BatchPlan:
        """A plan over the first ``pad_to`` (default: len(image_slots)) entries; padding images get slot −1."""
        n = len(image_slots)
        m = n if pad_to is None else pad_to
        if not n <= m <= self.capacity:
            raise ValueError(f"a plan of {n} images padded to {m} does not fit buffers of {self.capacity}")
        padded = list(image_slots) + [-1] * (m - n)
        order = sorted(range(m), key=padded.__getitem__)  # stable: the slot-sorted image order
        if self._copied is not None:
            self._copied.synchronize()
        self._host_slots.numpy()[:m] = padded
        self._host_order.numpy()[:m] = order
        self.slots[:m].copy_(self._host_slots[:m], non_blocking=True)
        self.order[:m].copy_(self._host_order[:m], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return BatchPlan(image_slots=self.slots[:m], order=self.order[:m],
                         num_active=sum(s >= 0 for s in padded), max_rank=int(max_rank))
