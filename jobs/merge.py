"""The offline merge job: sources → one adapter carrying every source's heads, with provenance.

Sources must share the base (fingerprint) and the preprocessing; task names must be unique
across sources unless renamed. The merged adapter records the sources (names and content
hashes), the method, every parameter, and per matrix the kept rank and the share of singular
value mass kept. A report (JSON + PNG of the spectra and kept ranks per layer) goes beside it.
"""

from __future__ import annotations

import inspect
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from medlego.runtime import merging
from medlego.runtime.adapter import Adapter, TaskSpec, utc_now
from medlego.runtime.errors import BadInputError, IncompatibleAdapterError

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
