"""Adapter merge math, one matrix at a time: Med-LEGO (factor space) and the baselines.

Every method maps the sources' factors of one adapted matrix (block i, Q or V) to merged
factors :class:`LowRank` plus a record (kept rank, share of singular-value mass kept).

Med-LEGO (DESIGN.md): Δ = SVD( Σ_i w_i B_i diag(E_i) A_i ) with w_i = 1/N by default, keeping
the smallest k whose cumulative singular-value sum reaches v·total. The sum has rank ≤ Σ r_i,
so it is computed exactly in factor space: stack P = [w_1 B_1 E_1, …] [d, Σr] and
Q = [A_1; …] [Σr, d], QR both (P = Q_p R_p, Qᵀ = Q_q R_q), SVD the Σr × Σr core R_p R_qᵀ =
U S Vᵀ, and the merged factors are B = Q_p U[:, :k], E = S[:k], A = (Q_q V[:, :k])ᵀ. No d × d
matrix is ever formed.

Baselines that are defined on dense ΔW (delta-avg, task-arithmetic, TIES, DARE, magnitude
pruning, MagMax) form ΔW_i, merge, and write the result back as an exact SVD-LoRA: its SVD cut
at the numerical rank, or at ``max_rank`` with the kept share reported. TIES follows PEFT's
convention (trim per tensor by magnitude, elect the sign by the total of the weighted values,
disjoint mean by count), so results agree with ``peft.utils.merge_utils`` on the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapter import LowRank

FLOAT = torch.float64  # merges are offline and small: compute in double, store in float32


@dataclass
class MatrixResult:
    factors: LowRank
    rank: int
    kept_share: float  # Σ kept singular values / Σ all (1.0 when nothing was cut)
    spectrum: list[float] = field(default_factory=list)  # singular values of the merged matrix before truncation


def _lowrank(b: torch.Tensor, e: torch.Tensor, a: torch.Tensor) -> LowRank:
    return LowRank(a.float().contiguous(), e.float().contiguous(), b.float().contiguous())


def _zero(d_out: int, d_in: int) -> LowRank:
    return LowRank(torch.zeros(1, d_in), torch.zeros(1), torch.zeros(d_out, 1))


def choose_rank(s: torch.Tensor, threshold: float, max_rank: int | None) -> int:
    """Smallest k whose cumulative singular-value sum reaches threshold·total (≥ 1), capped by max_rank."""
    total = float(s.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(s, 0)
    k = int(torch.searchsorted(cum, torch.tensor(threshold * total, dtype=cum.dtype) * (1 - 1e-12)).item()) + 1
    k = min(k, s.numel())
    return max(1, min(k, max_rank)) if max_rank else max(1, k)


def factor_svd(bs: list[torch.Tensor], as_: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of Σ_i bs[i] @ as_[i] in factor space → (U [d_out, m], S [m], Vh [m, d_in])."""
    p = torch.cat([b.to(FLOAT) for b in bs], dim=1)  # [d_out, Σr]
    q = torch.cat([a.to(FLOAT) for a in as_], dim=0)  # [Σr, d_in]
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    return qp @ u, s, vh @ qq.T


def med_lego(sources: list[LowRank], weights: list[float] | None = None, threshold: float = 0.997,
             max_rank: int | None = None) -> MatrixResult:
    n = len(sources)
    w = weights or [1.0 / n] * n
    u, s, vh = factor_svd([m.B.to(FLOAT) * (m.E.to(FLOAT) * wi) for m, wi in zip(sources, w)],
                          [m.A for m in sources])
    k = choose_rank(s, threshold, max_rank)
    total = float(s.sum())
    share = float(s[:k].sum()) / total if total > 0 else 1.0
    return MatrixResult(_lowrank(u[:, :k], s[:k], vh[:k]), k, share, s.tolist())


def dense_to_lowrank(delta: torch.Tensor, max_rank: int | None = None, rtol: float = 1e-7) -> MatrixResult:
    """Exact SVD-LoRA of a dense ΔW: its SVD cut at the numerical rank (or at max_rank)."""
    u, s, vh = torch.linalg.svd(delta.to(FLOAT), full_matrices=False)
    if float(s[0]) == 0.0:
        return MatrixResult(_zero(*delta.shape), 1, 1.0, s.tolist())
    numerical = int((s > s[0] * rtol).sum())
    k = min(numerical, max_rank) if max_rank else numerical
    share = float(s[:k].sum() / s.sum())
    return MatrixResult(_lowrank(u[:, :k], s[:k], vh[:k]), k, share, s.tolist())


def _dense(sources: list[LowRank]) -> torch.Tensor:
    return torch.stack([m.delta().to(FLOAT) for m in sources])  # [N, d_out, d_in]


def _pad_rank(m: LowRank, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·diag(E) [d, r], A [r, d]) zero-padded to rank r."""
    be = torch.zeros(m.B.shape[0], r, dtype=FLOAT)
    a = torch.zeros(r, m.A.shape[1], dtype=FLOAT)
    be[:, :m.rank] = m.B.to(FLOAT) * m.E.to(FLOAT)
    a[:m.rank] = m.A.to(FLOAT)
    return be, a


# -- factor-level baselines -----------------------------------------------------------------------

def lora_avg(sources: list[LowRank], weights: list[float] | None = None, max_rank: int | None = None) -> MatrixResult:
    """Average the LoRA factors separately: (Σ w_i B_i E_i)(Σ w_i A_i). Ranks differing between sources
    are zero-padded to the largest (the padded rows/columns contribute nothing to their own source)."""
    n = len(sources)
    w = weights or [1.0 / n] * n
    r = max(m.rank for m in sources)
    padded = [_pad_rank(m, r) for m in sources]
    b = sum(wi * be for wi, (be, _) in zip(w, padded))
    a = sum(wi * ai for wi, (_, ai) in zip(w, padded))
    u, s, vh = factor_svd([b], [a])
    k = choose_rank(s, 1.0, max_rank)
    return MatrixResult(_lowrank(u[:, :k], s[:k], vh[:k]), k, float(s[:k].sum() / s.sum()) if s.sum() > 0 else 1.0, s.tolist())


def pem(sources: list[LowRank], signs: list[int] | None = None, weights: list[float] | None = None,
        max_rank: int | None = None) -> MatrixResult:
    """PEM composition: arithmetic on the LoRA modules themselves. Addition adds the factors
    (A = Σ w_i A_i, B = Σ w_i B_i E_i); negating a module negates its B (so −ΔW), as in PEM."""
    n = len(sources)
    signs = signs or [1] * n
    w = weights or [1.0 / n] * n
    r = max(m.rank for m in sources)
    padded = [_pad_rank(m, r) for m in sources]
    b = sum(wi * si * be for wi, si, (be, _) in zip(w, signs, padded))
    a = sum(wi * ai for wi, (_, ai) in zip(w, padded))
    u, s, vh = factor_svd([b], [a])
    k = choose_rank(s, 1.0, max_rank)
    return MatrixResult(_lowrank(u[:, :k], s[:k], vh[:k]), k, float(s[:k].sum() / s.sum()) if s.sum() > 0 else 1.0, s.tolist())


# -- dense baselines ----------------------------------------------------------------------------------

def delta_avg(sources, weights=None, max_rank=None) -> MatrixResult:
    n = len(sources)
    w = torch.tensor(weights or [1.0 / n] * n, dtype=FLOAT).view(-1, 1, 1)
    return dense_to_lowrank((_dense(sources) * w).sum(0), max_rank)


def task_arithmetic(sources, scale: float = 0.3, max_rank=None) -> MatrixResult:
    return dense_to_lowrank(scale * _dense(sources).sum(0), max_rank)


def trim_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ⌊density·numel⌋ entries by magnitude (per tensor)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view_as(t)


def ties(sources, density: float = 0.2, scale: float = 1.0, weights=None, max_rank=None) -> MatrixResult:
    """TIES (PEFT convention): trim per tensor, elect the sign by the total of the trimmed values, then
    the disjoint mean (by count) of the weighted values that agree with it, × λ."""
    dense = torch.stack([trim_magnitude(t, density) for t in _dense(sources)])
    w = torch.tensor(weights or [1.0] * len(sources), dtype=FLOAT).view(-1, 1, 1)
    majority = torch.where(dense.sum(0) >= 0, 1.0, -1.0).to(FLOAT)
    agree = (dense.sign() == majority).to(FLOAT)  # trimmed (zero) entries never agree
    weighted = dense * w
    merged = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)
    return dense_to_lowrank(scale * merged, max_rank)


def dare(sources, drop: float = 0.5, seed: int = 0, weights=None, max_rank=None) -> MatrixResult:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1−p), then a weighted sum."""
    g = torch.Generator().manual_seed(seed)
    keep = 1.0 - drop
    out = []
    for t in _dense(sources):
        mask = torch.bernoulli(torch.full_like(t, keep), generator=g)
        out.append(t * mask / keep)
    w = torch.tensor(weights or [1.0] * len(sources), dtype=FLOAT).view(-1, 1, 1)
    return dense_to_lowrank((torch.stack(out) * w).sum(0), max_rank)


def magnitude_prune(sources, density: float = 0.2, weights=None, max_rank=None) -> MatrixResult:
    dense = torch.stack([trim_magnitude(t, density) for t in _dense(sources)])
    w = torch.tensor(weights or [1.0] * len(sources), dtype=FLOAT).view(-1, 1, 1)
    return dense_to_lowrank((dense * w).sum(0), max_rank)


def magmax(sources, max_rank=None) -> MatrixResult:
    """Per parameter, the source value of the largest magnitude."""
    dense = _dense(sources)
    idx = dense.abs().argmax(0, keepdim=True)
    return dense_to_lowrank(dense.gather(0, idx)[0], max_rank)


# -- SVD-aware newer methods -------------------------------------------------------------------------

def iso_c(sources, alpha: float = 1.0, max_rank=None) -> MatrixResult:
    """Iso-C: the summed ΔW with its spectrum flattened to α × its mean singular value (the mean over
    the numerically non-zero singular values: the sum of low-rank updates has rank ≤ Σr)."""
    u, s, vh = factor_svd([m.B.to(FLOAT) * m.E.to(FLOAT) for m in sources], [m.A for m in sources])
    if float(s[0]) == 0:
        return MatrixResult(_zero(u.shape[0], vh.shape[1]), 1, 1.0, s.tolist())
    nonzero = int((s > s[0] * 1e-7).sum())
    r = min(nonzero, max_rank) if max_rank else nonzero
    flat = torch.full((r,), alpha * float(s[:nonzero].mean()), dtype=FLOAT)
    # the flattened spectrum has equal values: a cut at r keeps r / nonzero of its mass
    return MatrixResult(_lowrank(u[:, :r], flat, vh[:r]), r, r / nonzero, s.tolist())


def _orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (polar factor): P Qᵀ from m = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def tsv(sources, keep: float | None = None, alpha: float = 1.0, max_rank=None) -> MatrixResult:
    """TSV-Merge: each task keeps its top ⌈keep·r_i⌉ singular directions (default keep = 1/N), the
    concatenated left and right singular vectors are decorrelated (orthogonalised), and
    ΔW = α · U⊥ diag(S) V⊥ᵀ."""
    n = len(sources)
    keep = keep if keep is not None else 1.0 / n
    us, ss, vs = [], [], []
    for m in sources:
        u, s, vh = factor_svd([m.B.to(FLOAT) * m.E.to(FLOAT)], [m.A])
        k = max(1, math.ceil(keep * m.rank))
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    u_perp, v_perp = _orthogonalise(u), _orthogonalise(v)
    order = torch.argsort(s, descending=True)
    k = min(len(s), max_rank) if max_rank else len(s)
    order = order[:k]
    share = float(s[order].sum() / s.sum()) if s.sum() > 0 else 1.0
    spectrum = torch.sort(s, descending=True).values.tolist()  # the report plots spectra in descending order
    return MatrixResult(_lowrank(u_perp[:, order], alpha * s[order], v_perp[:, order].T), k, share, spectrum)


METHODS = ("med-lego", "lora-avg", "delta-avg", "task-arithmetic", "ties", "dare", "magnitude-prune", "pem",
           "magmax", "iso-c", "tsv")
