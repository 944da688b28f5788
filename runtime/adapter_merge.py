"""Whole-adapter merging: sources → one adapter carrying every source's heads, with provenance.

The per-matrix math is in :mod:`.merging`; this is what the merge job and the server's
``/v1/merge`` both run. Sources must share the base (fingerprint) and the preprocessing; task
names must be unique across sources unless renamed. The merged adapter records the sources
(names and content hashes), the method, every parameter, and per matrix the kept rank and the
share of singular value mass kept. Parameters are checked for type and range first, so a bad
value is a one-line error, never a failure halfway through the matrices.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from dataclasses import replace

from . import merging
from .adapter import Adapter, utc_now
from .errors import BadInputError, IncompatibleAdapterError

# method -> (function, parameters it accepts)
_DISPATCH = {
    "med-lego": (merging.med_lego, ("weights", "threshold", "max_rank")),
    "lora-avg": (merging.lora_avg, ("weights", "max_rank")),
    "delta-avg": (merging.delta_avg, ("weights", "max_rank")),
    "task-arithmetic": (merging.task_arithmetic, ("scale", "max_rank")),
    "ties": (merging.ties, ("density", "scale", "weights", "max_rank")),
    "dare": (merging.dare, ("drop", "seed", "weights", "max_rank")),
    "magnitude-prune": (merging.magnitude_prune, ("density", "weights", "max_rank")),
    "pem": (merging.pem, ("signs", "weights", "max_rank")),
    "magmax": (merging.magmax, ("max_rank",)),
    "iso-c": (merging.iso_c, ("alpha", "max_rank")),
    "tsv": (merging.tsv, ("keep", "alpha", "max_rank")),
}

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


def merge_adapters(sources: list[Adapter], method: str, params: dict | None = None, *,
                   source_info: list[dict] | None = None, task_names: list[str] | None = None) -> tuple[Adapter, dict]:
    """Merge; returns (adapter, report). source_info: per source {"ref", "sha256", ...} for provenance."""
    if method not in _DISPATCH:
        raise BadInputError(f"unknown merge method '{method}'; choose from {', '.join(merging.METHODS)}")
    params = {k: v for k, v in (params or {}).items() if v is not None}
    fn, accepted = _DISPATCH[method]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise BadInputError(f"method '{method}' takes {', '.join(accepted)}; not {', '.join(unknown)}")
    check_params(method, params)
    info = source_info or [{"ref": f"source{i}"} for i in range(len(sources))]
    labels = [s.get("ref") or f"source{i}" for i, s in enumerate(info)]
    check_sources(sources, labels)
    for key in ("weights", "signs"):
        if key in params and len(params[key]) != len(sources):
            raise BadInputError(f"{key} has {len(params[key])} values for {len(sources)} sources")
    tasks, heads = merged_tasks(sources, labels, task_names)
    # Provenance records every parameter, defaults included (None = equal weights / no cap / the method's rule).
    defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items() if k in accepted}
    recorded = {**defaults, **params}
    t0 = time.perf_counter()
    q, v, per_matrix = [], [], {}
    for i in range(sources[0].depth):
        for target, out in (("q", q), ("v", v)):
            res = fn([s.matrix(i, target) for s in sources], **params)
            out.append(res.factors)
            per_matrix[f"blocks.{i}.{target}"] = {"rank": res.rank, "kept_share": round(res.kept_share, 6),
                                                 "spectrum": [round(x, 6) for x in res.spectrum[:64]]}
    seconds = time.perf_counter() - t0
    provenance = {
        "kind": "merged", "method": method, "parameters": recorded,
        "sources": [{**{k: s.get(k) for k in ("ref", "name", "version", "sha256", "path") if s.get(k) is not None},
                     "tasks": [t.name for t in ad.tasks]} for s, ad in zip(info, sources)],
        "matrices": {k: {"rank": m["rank"], "kept_share": m["kept_share"]} for k, m in per_matrix.items()},
        "task_names": [t.name for t in tasks],
    }
    adapter = Adapter(base=sources[0].base, tasks=tasks, preprocess=sources[0].preprocess, q=tuple(q), v=tuple(v),
                      heads=heads, provenance=provenance, created=utc_now())
    report = {"method": method, "parameters": recorded, "sources": provenance["sources"], "seconds": seconds,
              "matrices": per_matrix, "max_rank": adapter.max_rank, "lora_params": adapter.lora_params}
    return adapter, report
