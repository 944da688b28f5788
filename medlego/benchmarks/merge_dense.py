"""The dense paths of the factor-space merges, written as the papers' official code computes them.

Each forms every ΔW_i as a d_out × d_in matrix and takes full SVDs of d × d matrices; the factor-space
versions in ``runtime/merging.py`` must give the same ΔW (``tests/test_merge_factor.py``) and are
timed against these (``merge_speed.py``). Where the official code would hand LAPACK's arbitrary
null-space vectors a non-zero weight (see runtime/merging.py), these keep only the numerically
non-zero directions, as the factor-space versions do; everything else is the official recipe.
"""

from __future__ import annotations

import torch

from medlego.runtime import merging
from medlego.runtime.adapter import LowRank

FLOAT = torch.float64


def deltas(sources: list[LowRank]) -> list[torch.Tensor]:
    return [(m.B.to(FLOAT) * m.E.to(FLOAT)) @ m.A.to(FLOAT) for m in sources]


def _nonzero(s: torch.Tensor) -> int:
    return int((s > s[0] * merging.RTOL).sum()) if float(s[0]) > 0 else 0


def med_lego(sources: list[LowRank], threshold: float = 0.997) -> torch.Tensor:
    """Mean ΔW, full SVD, the smallest k reaching threshold of the spectrum's sum."""
    mean = sum(deltas(sources)) / len(sources)
    u, s, vh = torch.linalg.svd(mean)
    k = merging.choose_rank(s, threshold, None)
    return (u[:, :k] * s[:k]) @ vh[:k]


def delta_avg(sources: list[LowRank]) -> torch.Tensor:
    """Mean ΔW, through its SVD cut at the numerical rank (what the merged adapter stores)."""
    u, s, vh = torch.linalg.svd(sum(deltas(sources)) / len(sources))
    k = _nonzero(s)
    return (u[:, :k] * s[:k]) @ vh[:k]


def iso_c(sources: list[LowRank], alpha: float = 1.0) -> torch.Tensor:
    """iso.py: SVD of the summed task vectors, every singular value set to their mean over min(m, n)."""
    u, s, vh = torch.linalg.svd(sum(deltas(sources)), full_matrices=False)
    k = _nonzero(s)
    return alpha * s.mean() * u[:, :k] @ vh[:k]


def tsv(sources: list[LowRank], alpha: float = 1.0) -> torch.Tensor:
    """TSVM_utils.py: per task its top int(min(m, n)/N) singular directions placed side by side in
    min(m, n)-wide arrays, both arrays replaced by their polar factor (U_u V_u from a full SVD)."""
    n = len(sources)
    per_task = None
    for i, delta in enumerate(deltas(sources)):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if per_task is None:
            per_task = int(s.shape[0] / n)
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        k = min(per_task, _nonzero(s))
        sum_u[:, i * per_task:i * per_task + k] = u[:, :k]
        sum_s[i * per_task:i * per_task + k] = s[:k]
        sum_v[i * per_task:i * per_task + k] = vh[:k]
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    return alpha * torch.linalg.multi_dot((uu @ vu, torch.diag(sum_s), uv @ vv))
