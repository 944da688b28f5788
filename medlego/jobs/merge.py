"""The merge job around :func:`medlego.runtime.adapter_merge.merge_adapters` (the server runs that too):
tuning a method's hyper-parameters on validation data, and the report beside the merged file.

Tuning is the papers' protocol (Iso-C, TSV and Task Arithmetic choose α/λ this way): merge at every
point of the method's grid, evaluate on each task's *validation* split, keep the point with the best
mean normalised metric — each task's metric divided by that of the source adapter that carries the
task, so that easy and hard tasks weigh alike. The metric is accuracy, or mean AUC for a multi-label
task, as in training's checkpoint choice. Test data is never seen.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from medlego.runtime.adapter import Adapter
from medlego.runtime.adapter_merge import merge_adapters, method
from medlego.runtime.base import BaseModel
from medlego.runtime.errors import BadInputError, IncompatibleAdapterError
from medlego.runtime.model import AdaptedViT

from .datasets import Dataset
from .evaluate import evaluate_adapter


def key_metric(m: dict, multilabel: bool) -> float:
    """Accuracy, or mean AUC for multi-label tasks (NaN, for a split with one class, counts as 0)."""
    v = m["auc"] if multilabel else m["accuracy"]
    return 0.0 if math.isnan(v) else float(v)


def source_of_tasks(sources: list[Adapter], task_names: list[str] | None) -> dict[str, tuple[Adapter, str]]:
    """Merged task name → (the source that carries it, its name there), in merge_adapters' order."""
    pairs = [(ad, t.name) for ad in sources for t in ad.tasks]
    names = task_names or [n for _, n in pairs]
    return dict(zip(names, pairs))


def grid_points(method_name: str, fixed: dict) -> tuple[dict[str, tuple], list[dict]]:
    """(the grid searched, its points in order) for a method, less the parameters the caller fixed."""
    grid = {k: v for k, v in method(method_name).grid.items() if k not in fixed}
    if not method(method_name).grid:
        raise BadInputError(f"method '{method_name}' has no α, λ, density or threshold to tune")
    if not grid:
        raise BadInputError(f"every tunable parameter of '{method_name}' ({', '.join(method(method_name).grid)}) is fixed")
    return grid, [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def tune(base: BaseModel, sources: list[Adapter], method_name: str, sets: dict[str, Dataset], fixed: dict, *,
         task_names: list[str] | None = None, files: dict[str, str] | None = None, progress: bool = True,
         log=print) -> tuple[dict, dict]:
    """Search the method's grid on the validation splits of ``sets`` ({merged task name: dataset}).

    Returns (the parameters to merge with: ``fixed`` plus the choice, the record for the provenance)."""
    from tqdm import tqdm

    grid, points = grid_points(method_name, fixed)
    if sources and sources[0].base.fingerprint != base.fingerprint:
        raise IncompatibleAdapterError(f"the sources were made for base {sources[0].base.model} "
                                       f"({sources[0].base.fingerprint[:12]}…), not the one given to tune on "
                                       f"({base.name}, {base.fingerprint[:12]}…)")
    carriers = source_of_tasks(sources, task_names)
    model = AdaptedViT(base)
    reference = {}
    for task, data in sets.items():
        ad, own = carriers[task]
        reference[task] = key_metric(evaluate_adapter(base, ad, data, own, "val", model=model), data.multilabel)
    trials = []
    for point in tqdm(points, desc=f"tuning {method_name}", unit="merge",
                      disable=None if progress else True):  # None: off when stderr is not a terminal
        merged, _ = merge_adapters(sources, method_name, {**fixed, **point}, task_names=task_names)
        per_task = {t: key_metric(evaluate_adapter(base, merged, d, t, "val", model=model), d.multilabel)
                    for t, d in sets.items()}
        normalised = [per_task[t] / reference[t] if reference[t] > 0 else 0.0 for t in sets]
        trials.append({"params": point, "score": sum(normalised) / len(normalised),
                       "per_task": {t: round(v, 6) for t, v in per_task.items()}})
    best = max(trials, key=lambda tr: tr["score"])  # the first of equal scores: grid order breaks ties
    log(f"tuned {method_name} on {', '.join(sets)} (validation): {best['params']} "
        f"(mean normalised {best['score']:.4f}, {len(trials)} points)")
    record = {
        "criterion": "mean over tasks of the validation metric (accuracy; mean AUC if multi-label) "
                     "divided by the source adapter's own",
        "tasks": {t: {"file": (files or {}).get(t, d.source), "sha256": d.fingerprint, "val_images": d.sizes()["val"],
                      "source_metric": round(reference[t], 6)} for t, d in sets.items()},
        "fixed": fixed, "grid": {k: list(v) for k, v in grid.items()},
        "trials": [{**tr, "score": round(tr["score"], 6)} for tr in trials],
        "chosen": best["params"], "score": round(best["score"], 6),
    }
    return {**fixed, **best["params"]}, record


def write_report(report: dict, out: str | Path) -> tuple[Path, Path | None]:
    """<out>.report.json and <out>.report.png (spectra and kept rank per layer)."""
    out = Path(out)
    js = out.with_suffix(".report.json")
    js.write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return js, None
    names = list(report["matrices"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        spec = report["matrices"][name]["spectrum"]
        if spec:
            ax1.semilogy(range(1, len(spec) + 1), [max(s, 1e-12) for s in spec], alpha=0.5,
                         color="tab:blue" if name.endswith(".q") else "tab:orange")
    ax1.set(xlabel="singular value index", ylabel="singular value", title=f"{report['method']}: spectra (Q blue, V orange)")
    blocks = sorted({int(n.split(".")[1]) for n in names})
    for target, color in (("q", "tab:blue"), ("v", "tab:orange")):
        ax2.plot(blocks, [report["matrices"][f"blocks.{b}.{target}"]["rank"] for b in blocks], marker="o",
                 color=color, label=target.upper())
    ax2.set(xlabel="block", ylabel="kept rank", title="kept rank per layer")
    ax2.legend()
    fig.tight_layout()
    png = out.with_suffix(".report.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return js, png
