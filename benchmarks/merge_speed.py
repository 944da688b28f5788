"""Merge time: Med-LEGO in factor space vs the dense path (form each ΔW, average, full SVD).

Default: 7 vit_base-sized adapters (d = 768, 12 blocks, Q and V, r = 4), threshold 0.997, the
paper's setting. Both paths produce ΔW that is compared (relative Frobenius error) in the same
run, so the ratio is between equal results.

    python -m medlego.benchmarks.merge_speed [--sources 7] [--dim 768] [--depth 12] [--rank 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medlego.runtime import merging
from medlego.jobs.synthetic import random_lowrank

from .common import hardware, write_json


def dense_med_lego(sources, threshold: float):
    """The dense reference: mean ΔW (d × d), full SVD, same top-k rule."""
    mean = sum(((m.B.double() * m.E.double()) @ m.A.double()) for m in sources) / len(sources)
    u, s, vh = torch.linalg.svd(mean)
    k = merging.choose_rank(s, threshold, None)
    return (u[:, :k] * s[:k]) @ vh[:k], k


def run(sources: int = 7, dim: int = 768, depth: int = 12, rank: int = 4, threshold: float = 0.997,
        repeats: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    matrices = [[random_lowrank(dim, rank, g, scale=0.05) for _ in range(sources)] for _ in range(2 * depth)]
    factor_times, dense_times, errs, ranks_equal = [], [], [], True
    for rep in range(repeats):
        t0 = time.perf_counter()
        fast = [merging.med_lego(ms, threshold=threshold) for ms in matrices]
        factor_times.append(time.perf_counter() - t0)
        if rep < 2:  # the dense path is slow: two repeats are enough
            t0 = time.perf_counter()
            dense = [dense_med_lego(ms, threshold) for ms in matrices]
            dense_times.append(time.perf_counter() - t0)
    for f, (ref, k) in zip(fast, dense):
        got = (f.factors.B.double() * f.factors.E.double()) @ f.factors.A.double()
        errs.append(float((got - ref).norm() / ref.norm()))
        ranks_equal &= f.rank == k
    factor, dense_s = min(factor_times), min(dense_times)
    return {"sources": sources, "dim": dim, "depth": depth, "rank": rank, "matrices": 2 * depth, "threshold": threshold,
            "factor_space_s": factor, "dense_s": dense_s, "speedup": dense_s / factor,
            "max_relative_error": max(errs), "ranks_equal": ranks_equal, "goal_speedup": 10.0,
            "goal_met": dense_s / factor >= 10.0 and max(errs) < 1e-5 and ranks_equal}


def to_markdown(r: dict) -> str:
    return "\n".join([
        f"Merging {r['sources']} adapters of d={r['dim']}, {r['depth']} blocks × Q,V, r={r['rank']} (threshold {r['threshold']})",
        "",
        "| path | time (s) |",
        "| --- | ---: |",
        f"| Med-LEGO, factor space (QR + SVD of a {r['sources'] * r['rank']}×{r['sources'] * r['rank']} core) | {r['factor_space_s']:.4f} |",
        f"| dense (form ΔW, full {r['dim']}×{r['dim']} SVD) | {r['dense_s']:.4f} |",
        "",
        f"Speed-up **{r['speedup']:.1f}×** (goal ≥ {r['goal_speedup']:.0f}×: {'met' if r['goal_met'] else 'NOT met'}); "
        f"max relative ΔW difference {r['max_relative_error']:.2e}; same kept rank everywhere: {r['ranks_equal']}.",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=int, default=7)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.997)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    r = run(a.sources, a.dim, a.depth, a.rank, a.threshold)
    r["hardware"] = hardware()
    out = Path(a.out)
    write_json(r, out / "merge_speed.json")
    (out / "merge_speed.md").write_text(to_markdown(r) + "\n")
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
