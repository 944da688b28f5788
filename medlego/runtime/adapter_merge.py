"""Whole-adapter merging: sources → one adapter carrying every source's heads, with provenance.

The per-matrix math is in :mod:`.merging`; this is what the merge job and the server's
``/v1/merge`` both run. Sources must share the base (fingerprint) and the preprocessing; task
names must be unique across sources unless renamed. The merged adapter records the sources
(names and content hashes), the method, every parameter, per matrix the kept rank and the share
of singular value mass kept, and, when the parameters were tuned on validation data, the grid
and the choice. Parameters are checked for type and range first, so a bad value is a one-line
error, never a failure halfway through the matrices.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from . import merging
from .adapter import Adapter, utc_now
from .errors import BadInputError, IncompatibleAdapterError


@dataclass(frozen=True)
class Method:
    fn: Callable[..., merging.MatrixResult]
    params: tuple[str, ...]  # what a caller may set; the defaults are fn's own (seed: 0)
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # what tuning on validation data searches


# The grids follow the papers' searches on their own scales: λ of task arithmetic over (0, 1] as in
# TA/Iso's code, Iso-C's and TSV's α as in the official code (0.1 … 3), widened for Iso-C because its
# α multiplies the mean over all min(m, n) singular values, which for LoRA sums is ≪ the non-zero ones
# (α ≈ min(m, n)/Σr gives them their own mean); densities and drop rates over the ranges TIES/DARE report.
_SCALE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_DENSITY = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
_TIES_SCALE = (0.5, 1.0, 1.5, 2.0)
_DROP = (0.1, 0.3, 0.5, 0.7, 0.9)
_SUM_SCALE = (0.2, 0.4, 0.6, 0.8, 1.0)
_ISO_ALPHA = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0, 22.0, 32.0, 45.0, 64.0)
_TSV_ALPHA = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)

_METHODS = {
    "med-lego": Method(merging.med_lego, ("weights", "threshold", "max_rank"),
                       {"threshold": (0.9, 0.95, 0.99, 0.997, 1.0)}),
    "lora-avg": Method(merging.lora_avg, ("weights", "max_rank")),
    "delta-avg": Method(merging.delta_avg, ("weights", "max_rank")),
    "task-arithmetic": Method(merging.task_arithmetic, ("scale", "max_rank"), {"scale": _SCALE}),
    "ties": Method(merging.ties, ("density", "scale", "weights", "max_rank"), {"density": _DENSITY, "scale": _TIES_SCALE}),
    "dare": Method(merging.dare, ("drop", "scale", "seed", "weights", "max_rank"), {"drop": _DROP, "scale": _SUM_SCALE}),
    "magnitude-prune": Method(merging.magnitude_prune, ("density", "scale", "weights", "max_rank"),
                              {"density": _DENSITY, "scale": _SUM_SCALE}),
    "pem": Method(merging.pem, ("signs", "weights", "max_rank")),
    "magmax": Method(merging.magmax, ("max_rank",)),
    "iso-c": Method(merging.iso_c, ("alpha", "max_rank"), {"alpha": _ISO_ALPHA}),
    "tsv": Method(merging.tsv, ("keep", "alpha", "max_rank"), {"alpha": _TSV_ALPHA}),
    "core-ties": Method(merging.core_ties, ("density", "scale", "weights", "max_rank"),
                        {"density": _DENSITY, "scale": _TIES_SCALE}),
    "core-dare": Method(merging.core_dare, ("drop", "scale", "seed", "weights", "max_rank"),
                        {"drop": _DROP, "scale": _SUM_SCALE}),
    "core-magnitude-prune": Method(merging.core_magnitude_prune, ("density", "scale", "weights", "max_rank"),
                                   {"density": _DENSITY, "scale": _SUM_SCALE}),
}
METHODS = tuple(_METHODS)

# parameter -> (kind, low, high, low inclusive, high inclusive); kind "list" is one number per source
_RANGES = {
    "threshold": ("float", 0.0, 1.0, False, True),
    "max_rank": ("int", 1, None, True, True),
    "scale": ("float", None, None, True, True),
    "density": ("float", 0.0, 1.0, False, True),
    "drop": ("float", 0.0, 1.0, True, False),
    "seed": ("int", 0, 2 ** 63 - 1, True, True),
    "alpha": ("float", 0.0, None, False, True),
    "keep": ("float", 0.0, 1.0, False, True),
    "weights": ("list", None, None, True, True),
    "signs": ("list", -1, 1, True, True),
}


def method(name: str) -> Method:
    if name not in _METHODS:
        raise BadInputError(f"unknown merge method '{name}'; choose from {', '.join(METHODS)}")
    return _METHODS[name]


def defaults(name: str) -> dict:
    """Every parameter of a method with its default (None = equal weights / no cap / the method's rule)."""
    m = method(name)
    sig = inspect.signature(m.fn).parameters
    return {k: (sig[k].default if k in sig else 0) for k in m.params}  # seed (→ a generator) defaults to 0


def _number(method: str, key: str, x, kind: str):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (kind == "int" and not isinstance(x, int)):
        raise BadInputError(f"bad parameters for merge method '{method}': '{key}' must be {'an integer' if kind == 'int' else 'a number'}, "
                            f"got {x!r:.40}")
    if not math.isfinite(x):
        raise BadInputError(f"bad parameters for merge method '{method}': '{key}' must be finite, got {x!r}")
    return x


def check_params(method: str, params: dict) -> None:
    """Type and range of every parameter (e.g. DARE's drop in [0, 1), TIES' density in (0, 1])."""
    for key, value in params.items():
        kind, low, high, low_in, high_in = _RANGES[key]
        values = value if kind == "list" else [value]
        if kind == "list" and not isinstance(value, (list, tuple)):
            raise BadInputError(f"bad parameters for merge method '{method}': '{key}' must be a list with one number per source")
        for x in values:
            x = _number(method, key, x, "int" if kind == "int" else "float")
            if key == "signs" and x not in (-1, 1):
                raise BadInputError(f"bad parameters for merge method '{method}': 'signs' takes +1 or -1 per source, got {x!r}")
            too_low = low is not None and (x < low or (x == low and not low_in))
            too_high = high is not None and (x > high or (x == high and not high_in))
            if too_low or too_high:
                lo = "" if low is None else f"{'[' if low_in else '('}{low:g}"
                hi = "" if high is None else f"{high:g}{']' if high_in else ')'}"
                raise BadInputError(f"bad parameters for merge method '{method}': '{key}' must be in {lo or '(-inf'}, {hi or 'inf)'}, got {x!r}")


def check_sources(sources: list[Adapter], labels: list[str]) -> None:
    if not sources:
        raise BadInputError("merge needs at least one source adapter")
    # The base most sources share is the reference, so the odd one out is named even when it comes first
    # (Counter.most_common keeps first-seen order on ties: with two sources, the second is the odd one).
    keys = [(ad.base.model, ad.base.fingerprint) for ad in sources]
    ref_i = keys.index(Counter(keys).most_common(1)[0][0])
    ref, ref_label = sources[ref_i], labels[ref_i]
    for ad, label in zip(sources, labels):
        if ad.base.fingerprint != ref.base.fingerprint or ad.base.model != ref.base.model:
            raise IncompatibleAdapterError(
                f"source '{label}' was made for base {ad.base.model} ({ad.base.fingerprint[:12]}…), but "
                f"'{ref_label}' for {ref.base.model} ({ref.base.fingerprint[:12]}…): all sources must share one base")
        if ad.preprocess != ref.preprocess:
            raise BadInputError(f"source '{label}' preprocesses differently from '{ref_label}' "
                                f"({ad.preprocess.to_json()} vs {ref.preprocess.to_json()})")


def merged_tasks(sources: list[Adapter], labels: list[str], task_names: list[str] | None):
    """(tasks, heads) of every source, renamed by task_names (one per task, in order) if given."""
    pairs = [(t, ad.heads[t.name], label) for ad, label in zip(sources, labels) for t in ad.tasks]
    if task_names is not None:
        if len(task_names) != len(pairs):
            raise BadInputError(f"--task-names gives {len(task_names)} names for {len(pairs)} tasks "
                                f"({', '.join(t.name for t, _, _ in pairs)})")
        pairs = [(replace(t, name=n), h, lab) for (t, h, lab), n in zip(pairs, task_names)]
    seen: dict[str, str] = {}
    for t, _, label in pairs:
        if t.name in seen:
            raise BadInputError(f"task '{t.name}' appears in '{seen[t.name]}' and '{label}': rename with --task-names")
        seen[t.name] = label
    return tuple(t for t, _, _ in pairs), {t.name: h for t, h, _ in pairs}


def merge_adapters(sources: list[Adapter], method_name: str, params: dict | None = None, *,
                   source_info: list[dict] | None = None, task_names: list[str] | None = None,
                   tuning: dict | None = None) -> tuple[Adapter, dict]:
    """Merge; returns (adapter, report). source_info: per source {"ref", "sha256", ...} for provenance;
    tuning: the record of a search on validation data (jobs/merge.py), kept in the provenance."""
    m = method(method_name)
    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(params) - set(m.params))
    if unknown:
        raise BadInputError(f"method '{method_name}' takes {', '.join(m.params)}; not {', '.join(unknown)}")
    check_params(method_name, params)
    info = source_info or [{"ref": f"source{i}"} for i in range(len(sources))]
    labels = [s.get("ref") or f"source{i}" for i, s in enumerate(info)]
    check_sources(sources, labels)
    for key in ("weights", "signs"):
        if key in params and len(params[key]) != len(sources):
            raise BadInputError(f"{key} has {len(params[key])} values for {len(sources)} sources")
    tasks, heads = merged_tasks(sources, labels, task_names)
    # Provenance records every parameter, defaults included.
    recorded = {**defaults(method_name), **params}
    call = {k: v for k, v in params.items() if k != "seed"}
    if "seed" in m.params:
        # one generator for the whole merge: each matrix (and each source in it) draws its own mask
        call["generator"] = torch.Generator().manual_seed(recorded["seed"])
    t0 = time.perf_counter()
    q, v, per_matrix = [], [], {}
    for i in range(sources[0].depth):
        for target, out in (("q", q), ("v", v)):
            res = m.fn([s.matrix(i, target) for s in sources], **call)
            out.append(res.factors)
            per_matrix[f"blocks.{i}.{target}"] = {"rank": res.rank, "kept_share": round(res.kept_share, 6),
                                                 "spectrum": [round(x, 6) for x in res.spectrum[:64]]}
    seconds = time.perf_counter() - t0
    provenance = {
        "kind": "merged", "method": method_name, "parameters": recorded,
        "sources": [{**{k: s.get(k) for k in ("ref", "name", "version", "sha256", "path") if s.get(k) is not None},
                     "tasks": [t.name for t in ad.tasks]} for s, ad in zip(info, sources)],
        "matrices": {k: {"rank": r["rank"], "kept_share": r["kept_share"]} for k, r in per_matrix.items()},
        "task_names": [t.name for t in tasks],
        **({"tuning": tuning} if tuning is not None else {}),
    }
    adapter = Adapter(base=sources[0].base, tasks=tasks, preprocess=sources[0].preprocess, q=tuple(q), v=tuple(v),
                      heads=heads, provenance=provenance, created=utc_now())
    report = {"method": method_name, "parameters": recorded, "sources": provenance["sources"], "seconds": seconds,
              "matrices": per_matrix, "max_rank": adapter.max_rank, "lora_params": adapter.lora_params,
              **({"tuning": tuning} if tuning is not None else {})}
    return adapter, report
