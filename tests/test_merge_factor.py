"""Factor-space merges equal their dense paths (the official recipes on d × d ΔW); Core Space is exact
bookkeeping around an entry-wise rule, checked against a numpy reference."""

import numpy as np
import pytest
import torch

from medlego.benchmarks import merge_dense
from medlego.runtime import merging
from medlego.runtime.adapter import LowRank


def _sources(ranks, d_out=40, d_in=56, seed=0):
    """Random, non-orthonormal factors and rectangular matrices: nothing may rely on SVD-shaped inputs."""
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(r, d_in, generator=g) * 0.3, torch.rand(r, generator=g) + 0.5,
                    torch.randn(d_out, r, generator=g) * 0.3) for r in ranks]


def _delta(m: LowRank) -> torch.Tensor:
    return (m.B.double() * m.E.double()) @ m.A.double()


def _close(got: torch.Tensor, ref: torch.Tensor, tol=1e-5):
    assert float((got - ref).norm() / ref.norm()) < tol


FACTOR_VS_DENSE = {
    "med-lego": (lambda s: merging.med_lego(s, threshold=0.9), lambda s: merge_dense.med_lego(s, 0.9)),
    "delta-avg": (merging.delta_avg, merge_dense.delta_avg),
    "iso-c": (lambda s: merging.iso_c(s, alpha=1.7), lambda s: merge_dense.iso_c(s, alpha=1.7)),
    "tsv": (lambda s: merging.tsv(s, alpha=0.8), lambda s: merge_dense.tsv(s, alpha=0.8)),
}


@pytest.mark.parametrize("name", list(FACTOR_VS_DENSE))
@pytest.mark.parametrize("ranks, d_out, d_in", [([2, 3, 4, 1], 40, 56), ([4, 4, 4, 4], 12, 14)])
def test_factor_space_equals_the_dense_path(name, ranks, d_out, d_in):
    """Second shape: 4 tasks of rank 4 in 12 × 14, so TSV's official ⌊min(m, n)/N⌋ = 3 directions bind."""
    fast, dense = FACTOR_VS_DENSE[name]
    srcs = _sources(ranks, d_out, d_in, seed=len(name))
    _close(fast(srcs).factors.delta().double(), dense(srcs))


def test_iso_c_scale_is_the_official_mean_over_min_m_n():
    srcs = _sources([2, 3], d_out=30, d_in=20, seed=5)
    res = merging.iso_c(srcs, alpha=2.0)
    s = np.linalg.svd(sum(_delta(m).numpy() for m in srcs), compute_uv=False)
    assert res.rank == 5 and torch.allclose(res.factors.E.double(), torch.full((5,), 2.0 * s.mean(), dtype=torch.float64))


def test_tsv_keeps_the_official_share_and_rounds_keep_up():
    srcs = _sources([4, 4, 4, 4], d_out=12, d_in=14, seed=6)
    assert merging.tsv(srcs).rank == 4 * 3  # ⌊12 / 4⌋ of each task's 4 directions
    assert merging.tsv(_sources([4, 3], seed=7), keep=0.5).rank == 2 + 2


def _np_core(srcs):
    """Core Space bases by numpy: left singular vectors of the stacked B, right ones of the stacked A."""
    b = np.concatenate([m.B.double().numpy() for m in srcs], 1)
    a = np.concatenate([m.A.double().numpy() for m in srcs], 0)
    u_ref = np.linalg.svd(b, full_matrices=False)[0]
    vh_ref = np.linalg.svd(a, full_matrices=False)[2]
    cores = [u_ref.T @ _delta(m).numpy() @ vh_ref.T for m in srcs]
    return u_ref, cores, vh_ref


def _np_trim(t, density):
    k = int(density * t.size)
    keep = np.argsort(-np.abs(t).ravel(), kind="stable")[:k]
    out = np.zeros(t.size)
    out[keep] = t.ravel()[keep]
    return out.reshape(t.shape)


def _np_ties(ts, density, w):
    trimmed = np.stack([_np_trim(t, density) for t in ts])
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == sign
    return (trimmed * np.asarray(w)[:, None, None] * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_core_space_is_exact_and_its_variants_match_a_numpy_reference():
    srcs = _sources([3, 2, 4], seed=8)
    u_ref, cores, vh_ref = merging.core_space(srcs)
    for m, c in zip(srcs, cores):
        _close(u_ref @ c @ vh_ref, _delta(m), 1e-10)  # ΔW_i = U_ref M_i V_refᵀ exactly
    nu, ncores, nvh = _np_core(srcs)
    w = [1.0, 0.5, 2.0]
    ref = nu @ (1.3 * _np_ties(ncores, 0.3, w)) @ nvh
    _close(merging.core_ties(srcs, density=0.3, scale=1.3, weights=w).factors.delta().double(), torch.from_numpy(ref))
    ref = nu @ (0.7 * sum(wi * _np_trim(c, 0.4) for wi, c in zip(w, ncores))) @ nvh
    got = merging.core_magnitude_prune(srcs, density=0.4, scale=0.7, weights=w).factors.delta().double()
    _close(got, torch.from_numpy(ref))
    # DARE: the same masks from the same seeded generator, drawn source by source
    g = torch.Generator().manual_seed(3)
    masks = [torch.bernoulli(torch.full(c.shape, 0.6, dtype=torch.float64), generator=g).numpy() for c in ncores]
    ref = nu @ (0.5 * sum(wi * c * mk / 0.6 for wi, c, mk in zip(w, ncores, masks))) @ nvh
    got = merging.core_dare(srcs, drop=0.4, scale=0.5, weights=w, generator=torch.Generator().manual_seed(3))
    _close(got.factors.delta().double(), torch.from_numpy(ref))
    # with nothing trimmed, pruning in core space is task arithmetic: the basis drops out
    _close(merging.core_magnitude_prune(srcs, density=1.0, scale=0.3).factors.delta().double(),
           merging.task_arithmetic(srcs, scale=0.3).factors.delta().double())
