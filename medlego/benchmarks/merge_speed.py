"""Merge time: the factor-space merges vs their dense paths (form each ΔW, full d × d SVDs).

Default: 7 vit_base-sized adapters (d = 768, 12 blocks, Q and V, r = 4), the paper's setting.
For each exact method (Med-LEGO at v = 0.997, delta-avg, Iso-C, TSV-Merge) both paths run on the
same matrices and their ΔW are compared (relative Frobenius error) in the same run, so each ratio
is between equal results. The entry-wise methods are timed beside their Core Space variants too;
those are different methods (the entries live in another basis), so that line is time only.

    python -m medlego.benchmarks.merge_speed [--sources 7] [--dim 768] [--depth 12] [--rank 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medlego.jobs.synthetic import random_lowrank
from medlego.runtime import merging

from . import merge_dense
from .common import OUT_HELP, hardware, write_json, results_dir

# method -> (factor space, dense path); both map one matrix's sources to ΔW
EXACT = {
    "med-lego": (lambda ms: merging.med_lego(ms, threshold=0.997), lambda ms: merge_dense.med_lego(ms, 0.997)),
    "delta-avg": (merging.delta_avg, merge_dense.delta_avg),
    "iso-c": (merging.iso_c, merge_dense.iso_c),
    "tsv": (merging.tsv, merge_dense.tsv),
}
# entry-wise method -> (its Core Space variant, the dense method): different results, timed only
CORE = {
    "ties": (merging.core_ties, merging.ties),
    "magnitude-prune": (merging.core_magnitude_prune, merging.magnitude_prune),
}


def _seconds(fn, matrices, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(ms) for ms in matrices]
        best = min(best, time.perf_counter() - t0)
    return best, out


def _delta(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.factors.delta().double()


def run(sources: int = 7, dim: int = 768, depth: int = 12, rank: int = 4, repeats: int = 3, dense_repeats: int = 2,
        seed: int = 0, methods: tuple[str, ...] = ("med-lego",), core_methods: tuple[str, ...] = (),
        log=lambda *_: None) -> dict:
    """Times ``methods`` (of EXACT) and ``core_methods`` (of CORE). The defaults are what `medlego bench`
    reports (Med-LEGO only, its top-level ``speedup``); this script's command line times them all."""
    g = torch.Generator().manual_seed(seed)
    matrices = [[random_lowrank(dim, rank, g, scale=0.05) for _ in range(sources)] for _ in range(2 * depth)]
    for name in methods:  # one untimed call of every path first: LAPACK's and the allocator's first-use costs
        for fn in EXACT[name]:
            fn(matrices[0])
    for name in core_methods:
        for fn in CORE[name]:
            fn(matrices[0])
    exact = {}
    for name in methods:
        fast, dense = EXACT[name]
        t_fast, got = _seconds(fast, matrices, repeats)
        t_dense, ref = _seconds(dense, matrices, dense_repeats)  # the dense path is slow: fewer repeats
        err = max(float((_delta(a) - b).norm() / b.norm()) for a, b in zip(got, ref))
        exact[name] = {"factor_space_s": t_fast, "dense_s": t_dense, "speedup": t_dense / t_fast, "max_relative_error": err}
        log(f"{name}: factor {t_fast:.4f} s, dense {t_dense:.3f} s, {t_dense / t_fast:.0f}x, error {err:.1e}")
    core = {}
    for name in core_methods:
        in_core, dense = CORE[name]
        t_core, _ = _seconds(in_core, matrices, repeats)
        t_dense, _ = _seconds(dense, matrices, dense_repeats)
        core[name] = {"core_space_s": t_core, "dense_s": t_dense, "ratio": t_dense / t_core}
        log(f"{name}: core {t_core:.4f} s, dense {t_dense:.3f} s")
    return {"sources": sources, "dim": dim, "depth": depth, "rank": rank, "matrices": 2 * depth, "exact": exact,
            "core_space": core, "speedup": exact["med-lego"]["speedup"] if "med-lego" in exact else None,
            "goal_speedup": 10.0,
            "goal_met": all(r["speedup"] >= 10.0 and r["max_relative_error"] < 1e-5 for r in exact.values())}


def to_markdown(r: dict) -> str:
    core = r["sources"] * r["rank"]
    lines = [f"Merging {r['sources']} adapters of d={r['dim']}, {r['depth']} blocks × Q,V ({r['matrices']} matrices), "
             f"r={r['rank']}: factor space (QR of the stacked factors, SVD of a {core}×{core} core) vs the dense path "
             f"(each ΔW formed, full {r['dim']}×{r['dim']} SVDs, as the official code).", "",
             "| method | factor space (s) | dense (s) | speed-up | max relative ΔW difference |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, x in r["exact"].items():
        lines.append(f"| {name} | {x['factor_space_s']:.4f} | {x['dense_s']:.3f} | **{x['speedup']:.0f}×** | "
                     f"{x['max_relative_error']:.1e} |")
    lines += ["", f"Goal ≥ {r['goal_speedup']:.0f}× with equal ΔW (< 1e-5): {'met' if r['goal_met'] else 'NOT met'}."]
    if r["core_space"]:
        lines += ["", "Entry-wise methods and their Core Space variants (different methods, timed only):", "",
                  "| method | core space (s) | dense (s) | ratio |", "| --- | ---: | ---: | ---: |"]
    for name, x in r["core_space"].items():
        lines.append(f"| core-{name} vs {name} | {x['core_space_s']:.4f} | {x['dense_s']:.3f} | {x['ratio']:.0f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=int, default=7)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    a = p.parse_args(argv)
    r = run(a.sources, a.dim, a.depth, a.rank, methods=tuple(EXACT), core_methods=tuple(CORE), log=print)
    r["hardware"] = hardware()
    out = Path(a.out or results_dir())
    write_json(r, out / "merge_speed.json")
    (out / "merge_speed.md").write_text(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
