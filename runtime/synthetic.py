"""Random adapters for tests, demos and benchmarks (seeded, non-zero, any ranks and tasks)."""

from __future__ import annotations

import torch

from .adapter import Adapter, BaseSpec, Head, LowRank, Preprocess, TaskSpec, utc_now


def random_lowrank(d: int, rank: int, generator: torch.Generator, scale: float = 0.05) -> LowRank:
    """Orthonormal A and B (as a trained SVD-LoRA tends to be), positive singular values."""
    a = torch.linalg.qr(torch.randn(d, rank, generator=generator))[0].T.contiguous()
    b = torch.linalg.qr(torch.randn(d, rank, generator=generator))[0].contiguous()
    e = (torch.rand(rank, generator=generator) + 0.5) * scale * d ** 0.5
    return LowRank(a, e.sort(descending=True).values, b)


def random_adapter(base: BaseSpec, preprocess: Preprocess, *, rank: int | list[int] = 4,
                   tasks: list[TaskSpec] | None = None, seed: int = 0, scale: float = 0.05,
                   provenance: dict | None = None) -> Adapter:
    """An adapter with random factors. ``rank`` may be a list of 2·depth ranks (q0, v0, q1, v1, …)."""
    g = torch.Generator().manual_seed(seed)
    d, depth = base.embed_dim, base.depth
    ranks = [rank] * (2 * depth) if isinstance(rank, int) else list(rank)
    if len(ranks) != 2 * depth:
        raise ValueError(f"need {2 * depth} ranks, got {len(ranks)}")
    q = tuple(random_lowrank(d, ranks[2 * i], g, scale) for i in range(depth))
    v = tuple(random_lowrank(d, ranks[2 * i + 1], g, scale) for i in range(depth))
    tasks = tasks or [TaskSpec(f"task{seed}", tuple(f"class{c}" for c in range(3)), False)]
    heads = {t.name: Head(torch.randn(t.num_classes, d, generator=g) * 0.2,
                          torch.randn(t.num_classes, generator=g) * 0.1) for t in tasks}
    return Adapter(base=base, tasks=tuple(tasks), preprocess=preprocess, q=q, v=v, heads=heads,
                   provenance=provenance or {"kind": "random", "seed": seed}, created=utc_now())
