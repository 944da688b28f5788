"""SVD-LoRA on the Q and V rows of every block's fused qkv Linear.

Three layers, kept apart so each can be tested on its own:

* :class:`LoRAQKV` wraps ``blocks[i].attn.qkv`` (timm's module is wrapped, never forked). With
  no adapter source active it is exactly the base Linear.
* an *adapter source* supplies the packed factors for a forward: :class:`PackedSource` (a bank
  of adapters in slots plus a per-batch :class:`BatchPlan`: the engine's inference path) or
  :class:`TrainableSVDLoRA` (one adapter's trainable A, E, B: the training path).
* :func:`pack_adapter` turns an :class:`Adapter` into the packed, zero-padded layout the bank,
  the kernels and the reference share: A [L, 2, R, D], E [L, 2, R], B [L, 2, D, R]
  (index 0 = Q, 1 = V).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

import torch
from torch import nn

from medlego.kernels.plan import BatchPlan
from medlego.kernels.reference import qkv_lora_reference

from .adapter import Adapter, LowRank
from .vit import qkv_linear, typed

QKVFn = Callable[..., torch.Tensor]  # the shared kernel signature (see kernels/reference.py)


class AdapterSource(Protocol):
    def qkv(self, block: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ...


class LoRAState:
    """The adapter source of the current forward, shared by all wrapped blocks of one model.

    One forward at a time per model: the engine serialises batches, training is single-threaded.
    """

    def __init__(self) -> None:
        self.source: AdapterSource | None = None


class LoRAQKV(nn.Module):
    """``qkv(x)`` plus, when a source is active, its per-image B·diag(E)·A on Q and V."""

    def __init__(self, qkv: nn.Linear, block: int, state: LoRAState):
        super().__init__()
        self.qkv = qkv
        self.block = block
        self.state = state

    @property
    def weight(self) -> torch.Tensor:
        return self.qkv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.state.source
        if source is None:
            return self.qkv(x)
        return source.qkv(self.block, x, self.qkv.weight, self.qkv.bias)


def wrap_qkv(model: nn.Module) -> LoRAState:
    """Wrap every block's qkv in place (idempotent); returns the shared state."""
    state = getattr(model, "_medlego_lora_state", None)
    if state is not None:
        return state
    state = LoRAState()
    for i, blk in enumerate(typed(model).blocks):
        blk.attn.qkv = LoRAQKV(qkv_linear(blk), i, state)
    setattr(model, "_medlego_lora_state", state)
    return state


@contextmanager
def using(state: LoRAState, source: AdapterSource | None):
    previous, state.source = state.source, source
    try:
        yield
    finally:
        state.source = previous


# -- packed layout -------------------------------------------------------------------------------

def pack_adapter(adapter: Adapter, rank: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-padded packed factors of one adapter: A [L, 2, R, D], E [L, 2, R], B [L, 2, D, R]."""
    r_max = adapter.max_rank if rank is None else rank
    if adapter.max_rank > r_max:
        raise ValueError(f"adapter rank {adapter.max_rank} exceeds the packed rank {r_max}")
    mats = [(adapter.q[i], adapter.v[i]) for i in range(adapter.depth)]
    if all(q.rank == r_max and v.rank == r_max for q, v in mats):
        # the common case (one rank everywhere): one stack per tensor, no zero-fill pass
        # one stack per tensor over the 2L matrices, then a view: 3 copies, not 3 × (L + 1) (cold-load cost)
        pairs = [m for q, v in mats for m in (q, v)]
        a = torch.stack([m.A for m in pairs]).view(adapter.depth, 2, r_max, -1)
        e = torch.stack([m.E for m in pairs]).view(adapter.depth, 2, r_max)
        b = torch.stack([m.B for m in pairs]).view(adapter.depth, 2, -1, r_max)
        return a.to(device, dtype), e.to(device, dtype), b.to(device, dtype)
    depth, d = adapter.depth, adapter.base.embed_dim
    a = torch.zeros(depth, 2, r_max, d, dtype=dtype, device=device)
    e = torch.zeros(depth, 2, r_max, dtype=dtype, device=device)
    b = torch.zeros(depth, 2, d, r_max, dtype=dtype, device=device)
    for i, target, m in adapter.matrices():
        j = 0 if target == "q" else 1
        r = m.rank
        a[i, j, :r] = m.A.to(dtype)
        e[i, j, :r] = m.E.to(dtype)
        b[i, j, :, :r] = m.B.to(dtype)
    return a, e, b


class PackedSource:
    """Adapters packed in slots ([L, S, 2, R, D] …) plus the batch's slot per image."""

    def __init__(self, lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor,
                 plan: BatchPlan, qkv_fn: QKVFn = qkv_lora_reference):
        self.lora_a, self.lora_e, self.lora_b = lora_a, lora_e, lora_b  # [L, S, 2, R, D], [L, S, 2, R], [L, S, 2, D, R]
        self.plan = plan
        self.qkv_fn = qkv_fn

    def qkv(self, block, x, weight, bias):
        return self.qkv_fn(x, weight, bias, self.lora_a[block], self.lora_e[block], self.lora_b[block], self.plan)

    @staticmethod
    def for_adapters(adapters: list[Adapter], image_adapter: list[int | None], *,
                     dtype: torch.dtype = torch.float32, device="cpu", qkv_fn: QKVFn = qkv_lora_reference) -> "PackedSource":
        """A small bank of the given adapters; image n uses adapters[image_adapter[n]] (None = no adapter)."""
        r = max(ad.max_rank for ad in adapters)
        packs = [pack_adapter(ad, r, dtype, device) for ad in adapters]
        a = torch.stack([p[0] for p in packs], dim=1)
        e = torch.stack([p[1] for p in packs], dim=1)
        b = torch.stack([p[2] for p in packs], dim=1)
        slots = [-1 if s is None else s for s in image_adapter]
        return PackedSource(a, e, b, BatchPlan.build(slots, device=device, max_rank=r), qkv_fn)


# -- training form -------------------------------------------------------------------------------

class TrainableSVDLoRA(nn.Module):
    """One adapter's trainable A, E, B for every block's Q and V (packed, a single slot).

    Init (the Med-LEGO paper's SVD-LoRA): E = 0, A and B Gaussian, so ΔW = 0 at the start. ``ranks`` [L, 2] records
    each matrix's real rank when started from an adapter with mixed ranks: the padded rows stay
    exactly zero (their gradients are zero) and are masked out of the regulariser.
    """

    def __init__(self, depth: int, dim: int, rank: int = 4, *, init_std: float = 0.02,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.depth, self.dim, self.rank = depth, dim, rank
        self.A = nn.Parameter(torch.randn(depth, 2, rank, dim, generator=generator) * init_std)
        self.E = nn.Parameter(torch.zeros(depth, 2, rank))
        self.B = nn.Parameter(torch.randn(depth, 2, dim, rank, generator=generator) * init_std)
        self.register_buffer("ranks", torch.full((depth, 2), rank, dtype=torch.int64))
        self._plan: BatchPlan | None = None

    @staticmethod
    def from_adapter(adapter: Adapter) -> "TrainableSVDLoRA":
        """Start from an existing (e.g. merged) adapter's factors instead of E = 0."""
        a, e, b = pack_adapter(adapter)
        m = TrainableSVDLoRA(adapter.depth, adapter.base.embed_dim, adapter.max_rank)
        with torch.no_grad():
            m.A.copy_(a)
            m.E.copy_(e)
            m.B.copy_(b)
            for i, target, f in adapter.matrices():
                m.ranks[i, 0 if target == "q" else 1] = f.rank
        return m

    def qkv(self, block, x, weight, bias):
        n = x.shape[0]
        if self._plan is None or self._plan.batch != n or self._plan.image_slots.device != x.device:
            self._plan = BatchPlan.build([0] * n, device=x.device, max_rank=self.rank)
        return qkv_lora_reference(x, weight, bias, self.A[block].unsqueeze(0), self.E[block].unsqueeze(0),
                                  self.B[block].unsqueeze(0), self._plan)

    def rank_mask(self) -> torch.Tensor:
        """[L, 2, R] 1 where the rank index is real, 0 where padded."""
        idx = torch.arange(self.rank, device=self.ranks.device)
        return (idx.view(1, 1, -1) < self.ranks.unsqueeze(-1)).to(self.A.dtype)

    def orthogonality_penalty(self) -> torch.Tensor:
        """Σ over adapted matrices of ‖BᵀB − I‖²_F + ‖AAᵀ − I‖²_F (AdaLoRA-style, as Med-LEGO trains)."""
        mask = self.rank_mask()  # [L, 2, R]
        eye = torch.diag_embed(mask)  # identity on the real ranks only
        outer = mask.unsqueeze(-1) * mask.unsqueeze(-2)
        aat = self.A @ self.A.transpose(-1, -2)  # [L, 2, R, R]
        btb = self.B.transpose(-1, -2) @ self.B
        return (((aat - eye) * outer) ** 2).sum() + (((btb - eye) * outer) ** 2).sum()

    def factors(self) -> tuple[tuple[LowRank, ...], tuple[LowRank, ...]]:
        """Detached per-matrix factors, trimmed to each matrix's real rank (q, v)."""
        out: list[list[LowRank]] = [[], []]
        for i in range(self.depth):
            for j in range(2):
                r = int(self.ranks[i, j])
                out[j].append(LowRank(self.A[i, j, :r].detach().clone(), self.E[i, j, :r].detach().clone(),
                                      self.B[i, j, :, :r].detach().clone()))
        return tuple(out[0]), tuple(out[1])
