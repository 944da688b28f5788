"""Adapter merge math, one matrix at a time: Med-LEGO and the baselines, all in factor space where exact.

Every method maps the sources' factors of one adapted matrix (block i, Q or V) to merged factors
:class:`LowRank` plus a record (kept rank, share of singular-value mass kept, the spectrum).

**Factor space.** A sum of low-rank updates Σ_i w_i B_i diag(E_i) A_i has rank ≤ Σ r_i, and its exact
thin SVD comes from the stacked factors: P = [w_1 B_1 E_1, …] [d_out, Σr] and Q = [A_1; …] [Σr, d_in],
QR both (P = Q_p R_p, Qᵀ = Q_q R_q), SVD the Σr × Σr core R_p R_qᵀ = U S Vᵀ; then the SVD is
(Q_p U) S (Q_q V)ᵀ (:func:`factor_svd`). No d × d matrix is ever formed. Med-LEGO, delta-avg,
task arithmetic, Iso-C and TSV-Merge are computed this way, equal to their dense definitions (the
dense paths are in ``benchmarks/merge_dense.py``, compared in ``tests/test_merge_factor.py``).

* **Med-LEGO** (the Med-LEGO paper; docs/training-and-merging.md): SVD of Σ_i w_i ΔW_i (w_i = 1/N by default), keep the smallest k whose
  cumulative singular-value sum reaches v·total.
* **Iso-C** (Marczak et al. 2025, official ``iso.py``): the SVD of the summed ΔW with every singular
  value replaced by α · their mean, the mean taken over all min(d_out, d_in) of them as the official
  code does (the zeros included). The official code also gives the mean to the zero singular values'
  directions; for a sum of LoRAs those directions are any orthonormal completion of the span (the
  SVD does not define them, LAPACK picks one), so here the flat spectrum covers the sum's span only.
* **TSV-Merge** (Gargiulo et al. 2025, official ``TSVM_utils.py``): each task keeps its top
  ⌊min(d_out, d_in)/N⌋ singular directions (for LoRA ranks: all of them), the concatenated left and
  right singular vectors are orthogonalised (polar factor), ΔW = α · U⊥ diag(S) V⊥ᵀ. Directions
  beyond a task's numerical rank carry singular value 0 and, again, arbitrary vectors; they are left
  out, since in the official code they would perturb the polar factor by LAPACK's choice.

**Entry-wise methods** (TIES, DARE, magnitude pruning, MagMax) act on the entries of ΔW, so they
form it (d × d) and write the result back as an exact SVD-LoRA: its SVD cut at the numerical rank,
or at ``max_rank`` with the kept share reported. TIES follows PEFT's convention (trim per tensor by
magnitude, elect the sign by the total of the trimmed values, disjoint mean by count), so results
agree with ``peft.utils.merge_utils`` on the same inputs.

**Core Space** (Panariello et al., NeurIPS 2025): the same entry-wise rules applied to the sources'
*core* matrices instead. With U_ref the left singular vectors of the stacked B's and V_ref the
right singular vectors of the stacked A's (a basis shared by all sources), each ΔW_i is exactly
U_ref M_i V_refᵀ with M_i = U_refᵀ B_i E_i A_i V_ref [Σr × Σr]; TIES/DARE/pruning merge the M_i and
ΔW = U_ref M V_refᵀ. These are different methods from their dense namesakes (the entries are in
another basis), not approximations of them; they never form a d × d matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapter import LowRank

FLOAT = torch.float64  # merges are offline and small: compute in double, store in float32
RTOL = 1e-7  # singular values below RTOL · the largest are numerical zeros (the sum has rank ≤ Σr)


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


def _dims(sources: list[LowRank]) -> tuple[int, int]:
    return int(sources[0].B.shape[0]), int(sources[0].A.shape[1])


def _be(m: LowRank, w: float = 1.0) -> torch.Tensor:
    """w · B · diag(E) in double [d_out, r]."""
    return m.B.to(FLOAT) * (m.E.to(FLOAT) * w)


def numerical_rank(s: torch.Tensor) -> int:
    """How many singular values (descending) are not numerical zeros."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > s[0] * RTOL).sum())


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


def svd_result(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, max_rank: int | None) -> MatrixResult:
    """The exact SVD-LoRA of U diag(S) Vh: cut at the numerical rank, or at max_rank with the kept share."""
    n = numerical_rank(s)
    if n == 0:
        return MatrixResult(_zero(u.shape[0], vh.shape[1]), 1, 1.0, s.tolist())
    k = min(n, max_rank) if max_rank else n
    share = float(s[:k].sum() / s[:n].sum())
    return MatrixResult(_lowrank(u[:, :k], s[:k], vh[:k]), k, share, s.tolist())


def dense_to_lowrank(delta: torch.Tensor, max_rank: int | None = None) -> MatrixResult:
    """Exact SVD-LoRA of a dense ΔW: its SVD cut at the numerical rank (or at max_rank)."""
    u, s, vh = torch.linalg.svd(delta.to(FLOAT), full_matrices=False)
    return svd_result(u, s, vh, max_rank)


def weighted_sum_svd(sources: list[LowRank], weights: list[float]):
    """Exact thin SVD of Σ_i weights[i] · ΔW_i, in factor space."""
    return factor_svd([_be(m, w) for m, w in zip(sources, weights)], [m.A for m in sources])


def _equal(n: int) -> list[float]:
    return [1.0 / n] * n


# -- factor space: exact ---------------------------------------------------------------------------

def med_lego(sources: list[LowRank], weights: list[float] | None = None, threshold: float = 0.997,
             max_rank: int | None = None) -> MatrixResult:
    """SVD of Σ w_i ΔW_i (w_i = 1/N unless given), cut at the smallest k reaching threshold of the spectrum's sum."""
    u, s, vh = weighted_sum_svd(sources, weights or _equal(len(sources)))
    k = choose_rank(s, threshold, max_rank)
    total = float(s.sum())
    share = float(s[:k].sum()) / total if total > 0 else 1.0
    return MatrixResult(_lowrank(u[:, :k], s[:k], vh[:k]), k, share, s.tolist())


def delta_avg(sources: list[LowRank], weights: list[float] | None = None, max_rank: int | None = None) -> MatrixResult:
    """Σ w_i ΔW_i with w_i = 1/N unless given (the mean ΔW: model soup), not truncated."""
    return svd_result(*weighted_sum_svd(sources, weights or _equal(len(sources))), max_rank)


def task_arithmetic(sources: list[LowRank], scale: float = 0.3, max_rank: int | None = None) -> MatrixResult:
    """λ · Σ ΔW_i."""
    return svd_result(*weighted_sum_svd(sources, [scale] * len(sources)), max_rank)


def iso_c(sources: list[LowRank], alpha: float = 1.0, max_rank: int | None = None) -> MatrixResult:
    """Iso-C: the span of Σ ΔW_i with a flat spectrum α · Σσ / min(d_out, d_in) (the official scale)."""
    u, s, vh = weighted_sum_svd(sources, [1.0] * len(sources))
    n = numerical_rank(s)
    if n == 0:
        return MatrixResult(_zero(u.shape[0], vh.shape[1]), 1, 1.0, s.tolist())
    level = alpha * float(s.sum()) / min(_dims(sources))  # the mean of all min(m, n) singular values, zeros too
    k = min(n, max_rank) if max_rank else n
    # the flattened spectrum has equal values: a cut at k keeps k / n of its mass
    return MatrixResult(_lowrank(u[:, :k], torch.full((k,), level, dtype=FLOAT), vh[:k]), k, k / n, s.tolist())


def _orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (polar factor): P Qᵀ from the thin SVD m = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def tsv(sources: list[LowRank], keep: float = 1.0, alpha: float = 1.0, max_rank: int | None = None) -> MatrixResult:
    """TSV-Merge: per task the top min(⌈keep·r_i⌉, ⌊min(d_out, d_in)/N⌋) singular directions (r_i its
    numerical rank; keep = 1 is the official rule), bases orthogonalised, ΔW = α · U⊥ diag(S) V⊥ᵀ."""
    per_task = min(_dims(sources)) // len(sources)  # official: int(min(m, n) · 1/N)
    us, ss, vs = [], [], []
    for m in sources:
        u, s, vh = factor_svd([_be(m)], [m.A])
        k = min(math.ceil(keep * numerical_rank(s)), per_task)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    s = torch.cat(ss)
    if s.numel() == 0:
        return MatrixResult(_zero(*_dims(sources)), 1, 1.0, [])
    u_perp, v_perp = _orthogonalise(torch.cat(us, 1)), _orthogonalise(torch.cat(vs, 1))
    order = torch.argsort(s, descending=True)
    k = min(len(s), max_rank) if max_rank else len(s)
    order = order[:k]
    share = float(s[order].sum() / s.sum())
    spectrum = torch.sort(s, descending=True).values.tolist()  # the report plots spectra in descending order
    return MatrixResult(_lowrank(u_perp[:, order], alpha * s[order], v_perp[:, order].T), k, share, spectrum)


# -- factor level: the LoRA factors themselves -----------------------------------------------------

def _pad_rank(m: LowRank, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·diag(E) [d, r], A [r, d]) zero-padded to rank r."""
    be = torch.zeros(m.B.shape[0], r, dtype=FLOAT)
    a = torch.zeros(r, m.A.shape[1], dtype=FLOAT)
    be[:, :m.rank] = _be(m)
    a[:m.rank] = m.A.to(FLOAT)
    return be, a


def _factor_combination(sources: list[LowRank], b_weights: list[float], a_weights: list[float],
                        max_rank: int | None) -> MatrixResult:
    """(Σ b_i B_i E_i)(Σ a_i A_i) with ranks zero-padded to the largest."""
    r = max(m.rank for m in sources)
    padded = [_pad_rank(m, r) for m in sources]
    b = sum(wb * be for wb, (be, _) in zip(b_weights, padded))
    a = sum(wa * ai for wa, (_, ai) in zip(a_weights, padded))
    return svd_result(*factor_svd([b], [a]), max_rank)


def lora_avg(sources: list[LowRank], weights: list[float] | None = None, max_rank: int | None = None) -> MatrixResult:
    """Average the LoRA factors separately: (Σ w_i B_i E_i)(Σ w_i A_i), w_i = 1/N unless given. Ranks
    differing between sources are zero-padded to the largest. (PEFT's ``linear`` puts √w_i on each
    factor instead: its result with weights w equals this one with weights √w.)"""
    w = weights or _equal(len(sources))
    return _factor_combination(sources, w, w, max_rank)


def pem(sources: list[LowRank], signs: list[int] | None = None, weights: list[float] | None = None,
        max_rank: int | None = None) -> MatrixResult:
    """PEM composition: arithmetic on the LoRA modules. Addition adds the factors (A = Σ w_i A_i,
    B = Σ w_i s_i B_i E_i); negating a module negates its B, as PEM does (PEFT negates A instead)."""
    n = len(sources)
    w = weights or _equal(n)
    signs = signs or [1] * n
    return _factor_combination(sources, [wi * si for wi, si in zip(w, signs)], w, max_rank)


# -- entry-wise rules, shared by the dense methods and their Core Space variants -------------------

def _weights(weights: list[float] | None, n: int) -> torch.Tensor:
    return torch.tensor(weights or [1.0] * n, dtype=FLOAT).view(-1, 1, 1)


def trim_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ⌊density·numel⌋ entries by magnitude (per tensor)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view_as(t)


def ties_entries(stack: torch.Tensor, density: float, weights: list[float] | None) -> torch.Tensor:
    """TIES on [N, …] (PEFT convention): trim each, elect the sign by the total of the trimmed values,
    the disjoint mean (by count) of the weighted values whose trimmed value agrees with it."""
    trimmed = torch.stack([trim_magnitude(t, density) for t in stack])
    majority = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(FLOAT)
    agree = (trimmed.sign() == majority).to(FLOAT)  # trimmed (zero) entries never agree
    return (trimmed * _weights(weights, len(stack)) * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def dare_entries(stack: torch.Tensor, drop: float, generator: torch.Generator, weights: list[float] | None) -> torch.Tensor:
    """DARE on [N, …]: drop each entry with probability p, rescale survivors by 1/(1−p), weighted sum.
    The masks come from ``generator`` in order, so every source and every matrix gets its own."""
    keep = 1.0 - drop
    kept = [t * torch.bernoulli(torch.full_like(t, keep), generator=generator) / keep for t in stack]
    return (torch.stack(kept) * _weights(weights, len(stack))).sum(0)


def prune_entries(stack: torch.Tensor, density: float, weights: list[float] | None) -> torch.Tensor:
    """Magnitude pruning on [N, …]: trim each, weighted sum."""
    return (torch.stack([trim_magnitude(t, density) for t in stack]) * _weights(weights, len(stack))).sum(0)


# -- dense: entry-wise on ΔW ------------------------------------------------------------------------

def _dense(sources: list[LowRank]) -> torch.Tensor:
    return torch.stack([_be(m) @ m.A.to(FLOAT) for m in sources])  # [N, d_out, d_in]


def ties(sources, density: float = 0.2, scale: float = 1.0, weights=None, max_rank=None) -> MatrixResult:
    """TIES-Merging on ΔW (PEFT convention), × λ."""
    return dense_to_lowrank(scale * ties_entries(_dense(sources), density, weights), max_rank)


def dare(sources, drop: float = 0.5, scale: float = 1.0, weights=None, max_rank=None, *,
         generator: torch.Generator) -> MatrixResult:
    """DARE on ΔW, × λ. ``generator`` is the merge's one seeded generator (adapter_merge makes it)."""
    return dense_to_lowrank(scale * dare_entries(_dense(sources), drop, generator, weights), max_rank)


def magnitude_prune(sources, density: float = 0.2, scale: float = 1.0, weights=None, max_rank=None) -> MatrixResult:
    """Magnitude pruning on ΔW, × λ."""
    return dense_to_lowrank(scale * prune_entries(_dense(sources), density, weights), max_rank)


def magmax(sources, max_rank=None) -> MatrixResult:
    """Per parameter, the source value of the largest magnitude."""
    dense = _dense(sources)
    idx = dense.abs().argmax(0, keepdim=True)
    return dense_to_lowrank(dense.gather(0, idx)[0], max_rank)


# -- Core Space: the entry-wise rules on the sources' core matrices --------------------------------

def core_space(sources: list[LowRank]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_ref [d_out, R], cores [N, R, R'], V_refᵀ [R', d_in]) with ΔW_i = U_ref cores[i] V_refᵀ exactly."""
    u_ref = torch.linalg.svd(torch.cat([m.B.to(FLOAT) for m in sources], 1), full_matrices=False)[0]
    vh_ref = torch.linalg.svd(torch.cat([m.A.to(FLOAT) for m in sources], 0), full_matrices=False)[2]
    cores = torch.stack([(u_ref.T @ _be(m)) @ (m.A.to(FLOAT) @ vh_ref.T) for m in sources])
    return u_ref, cores, vh_ref


def _from_core(u_ref: torch.Tensor, core: torch.Tensor, vh_ref: torch.Tensor, max_rank: int | None) -> MatrixResult:
    u, s, vh = torch.linalg.svd(core)
    return svd_result(u_ref @ u, s, vh @ vh_ref, max_rank)


def core_ties(sources, density: float = 0.2, scale: float = 1.0, weights=None, max_rank=None) -> MatrixResult:
    """TIES on the core matrices (Core Space), × λ."""
    u_ref, cores, vh_ref = core_space(sources)
    return _from_core(u_ref, scale * ties_entries(cores, density, weights), vh_ref, max_rank)


def core_dare(sources, drop: float = 0.5, scale: float = 1.0, weights=None, max_rank=None, *,
              generator: torch.Generator) -> MatrixResult:
    """DARE on the core matrices (Core Space), × λ."""
    u_ref, cores, vh_ref = core_space(sources)
    return _from_core(u_ref, scale * dare_entries(cores, drop, generator, weights), vh_ref, max_rank)


def core_magnitude_prune(sources, density: float = 0.2, scale: float = 1.0, weights=None, max_rank=None) -> MatrixResult:
    """Magnitude pruning on the core matrices (Core Space), × λ."""
    u_ref, cores, vh_ref = core_space(sources)
    return _from_core(u_ref, scale * prune_entries(cores, density, weights), vh_ref, max_rank)
