"""The merge table on a pretrained base, over several seeds of the pipeline, with mean ± sd per cell.

For each seed s, merge_table.run trains the four specialists (task i from seed s + i: with seeds
0, 4, 8 no two specialists share a seed) on the base from ``--base`` (pretrain_base.py's weights,
rebuilt when missing), then merges and scores every method as merge_table does (defaults block,
validation-tuned block, probe / heads-only / specialist rows). Added here: Med-LEGO at
v ∈ {0.9, 0.99, 0.997}, so that its truncation shows against delta-avg (v = 1 keeps every direction
of the merged ΔW, which is what delta-avg is). The data (merge_tasks, data seeds 100 + i) and the
base are the same for every seed: the seeds vary the specialists' initialisation and data order,
hence everything merged from them.

    python -m medlego.benchmarks.merge_table_seeds --base medlego-results/pretrain_base.safetensors \\
        --specialists medlego-results/specialists --out benchmarks/results

Writes merge_table_pretrained.{json,md} (and one merge_table_pretrained_seed<s>.json per finished seed, so a
stopped run keeps its seeds); the md sets the committed random-init table (``--compare``) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medlego.jobs.datasets import load_dataset
from medlego.runtime.adapter import load_adapter
from medlego.runtime.adapter_merge import METHODS, merge_adapters
from medlego.runtime.base import load_base
from medlego.runtime.model import AdaptedViT

from . import merge_table as mt
from . import merge_tasks
from .common import OUT_HELP, hardware, results_dir, write_json
from .pretrain_base import default_weights_path, ensure_base

THRESHOLDS = (0.9, 0.99, 0.997)
# Specialists on the pretrained base. At the random-init table's lr 5e-3 they stayed *below* the frozen base's linear
# probe (on an 80-step snapshot of pretrain_base's corpus, after 8 epochs: nucleus-dot 0.595 vs probe 0.83, gland-square
# 0.635 vs 0.82: the fresh head and the adapter crawl out of chance); at lr 2e-2 and 12 epochs on 1,000 images they
# reached 0.94 and 0.93 there, and 0.90 / 0.90 (probe 0.76 / 0.775) on the 50-step base (pretrain_base.md).
EPOCHS, LR, TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES = 12, 2e-2, 1000, 100, 200
BLOCKS = ("reference", "defaults", "truncation", "tuned")


def make_data(tmp: Path, *, train: int, val: int, test: int, tasks: list[str] | None = None) -> dict[str, Path]:
    """The merge table's synthetic tasks, with its data seeds (100 + task index)."""
    return {t.name: merge_tasks.make_marked_dataset(tmp / f"{t.name}.npz", t, n_train=train, n_val=val, n_test=test,
                                                    seed=100 + i)
            for i, t in enumerate(merge_tasks.TASKS) if tasks is None or t.name in tasks}


def truncation_rows(base, save_dir: Path, datasets: dict[str, Path], spec_acc: dict, seed: int) -> dict:
    """Med-LEGO at each v of THRESHOLDS on the specialists run() saved, scored as the table scores."""
    sources = [load_adapter(save_dir / f"{t}.safetensors", expected_base=base.spec) for t in datasets]
    data = {t: load_dataset(p, input_size=base.input_size, seed=seed) for t, p in datasets.items()}
    model, rows = AdaptedViT(base), {}
    for v in THRESHOLDS:
        merged, report = merge_adapters(sources, "med-lego", {"threshold": v})
        rows[f"med-lego (v={v})"] = {**mt._row(mt._scores(base, merged, data, model), spec_acc),
                                     "parameters": report["parameters"], "max_rank": merged.max_rank}
    return rows


def one_seed(base, datasets: dict[str, Path], seed: int, save_dir: Path, a, log=print) -> dict:
    offsets = {t.name: i for i, t in enumerate(merge_tasks.TASKS)}
    methods = a.methods.split(",") if a.methods else METHODS
    r = mt.run(datasets, base, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed, methods=methods,
               save_dir=save_dir, offsets=offsets, tune_methods=not a.no_tune, log=log)
    assert r is not None
    spec_acc = {t: c["accuracy"] for t, c in r["reference"][mt.SPECIALISTS]["tasks"].items()}
    r["truncation"] = truncation_rows(base, save_dir, datasets, spec_acc, seed)
    r["hardware"] = hardware()
    return r


def _stats(xs: list) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs), "values": xs}


def aggregate(runs: list[dict]) -> dict:
    """Per block and row: mean ± sd over seeds of each task's accuracy, the mean and the normalised accuracy."""
    tasks, out = runs[0]["tasks"], {}
    for block in BLOCKS:
        out[block] = {}
        for name in runs[0][block]:
            rows = [r[block][name] for r in runs if r[block].get(name) is not None]
            if not rows:
                continue
            out[block][name] = {
                "tasks": {t: _stats([row["tasks"][t]["accuracy"] for row in rows if t in row["tasks"]]) for t in tasks},
                "mean_accuracy": _stats([row["mean_accuracy"] for row in rows]),
                "normalised_accuracy": _stats([row.get("normalised_accuracy") for row in rows]),
                "max_rank": sorted({row["max_rank"] for row in rows if "max_rank" in row}),
                "chosen": [row["chosen"] for row in rows if "chosen" in row]}
    return out


def ranking(block: dict, names) -> list[tuple[str, float]]:
    """Methods ordered by normalised accuracy (mean over seeds for the aggregate, the value for one table)."""
    def value(row):
        v = row["normalised_accuracy"]
        return v["mean"] if isinstance(v, dict) else v
    rows = [(n, value(block[n])) for n in names if n in block and block[n].get("normalised_accuracy") is not None]
    return sorted(rows, key=lambda x: -x[1])


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    return f"{s['mean']:.3f} (1 seed)" if s["n"] == 1 else f"{s['mean']:.3f} ± {s['sd']:.3f}"


def _table(rows: dict, tasks: list[str], tuned: bool = False) -> list[str]:
    out = ["| method | " + " | ".join(tasks) + " | mean | normalised | max rank |" + (" chosen per seed |" if tuned else ""),
           "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: |" + (" --- |" if tuned else "")]
    for name, row in rows.items():
        ranks = "/".join(str(x) for x in row["max_rank"]) or "—"
        line = (f"| {name} | " + " | ".join(_cell(row["tasks"].get(t)) for t in tasks)
                + f" | {_cell(row['mean_accuracy'])} | {_cell(row['normalised_accuracy'])} | {ranks} |")
        if tuned:
            line += " " + "; ".join(", ".join(f"{k}={v:g}" for k, v in c.items()) for c in row["chosen"]) + " |"
        out.append(line)
    return out


def _place(order: list[tuple[str, float]], name: str) -> str:
    names = [n for n, _ in order]
    return f"{names.index(name) + 1} of {len(names)}" if name in names else "—"


def reading(agg: dict, compare: dict | None) -> list[str]:
    """The comparison the issue asks for, computed (so that a rerun rewrites it from its own numbers)."""
    methods = [m for m in agg["defaults"]]
    now = ranking(agg["defaults"], methods)
    ml, da = agg["defaults"].get("med-lego"), agg["defaults"].get("delta-avg")
    lines = [f"Methods at their defaults by mean normalised accuracy on the pretrained base: "
             + ", ".join(f"{n} {v:.3f}" for n, v in now) + "."]
    if ml and da:
        lines.append(f"Med-LEGO (v = 0.997) ranks {_place(now, 'med-lego')} here; delta-avg "
                     f"{da['normalised_accuracy']['mean']:.3f} ± {da['normalised_accuracy']['sd']:.3f} vs Med-LEGO "
                     f"{ml['normalised_accuracy']['mean']:.3f} ± {ml['normalised_accuracy']['sd']:.3f}.")
    if compare:
        old = ranking(compare["defaults"], methods)
        lines.append(f"On the random-init base (committed merge_table.md, one seed) Med-LEGO ranked "
                     f"{_place(old, 'med-lego')} (" + ", ".join(f"{n} {v:.3f}" for n, v in old[:5]) + ", …).")
    trunc = agg.get("truncation", {})
    if trunc:
        lines.append("Med-LEGO's truncation: " + ", ".join(
            f"v = {n.split('=')[1].rstrip(')')}: {r['normalised_accuracy']['mean']:.3f} (max rank {'/'.join(map(str, r['max_rank']))})"
            for n, r in trunc.items()) + ".")
    return lines


def _header(r: dict, seeds: list[int], base_info: dict) -> list[str]:
    s, tasks = r["settings"], r["tasks"]
    sizes = ", ".join(f"{t} {r['datasets'][t]['splits']['train']}/{r['datasets'][t]['splits']['val']}/"
                      f"{r['datasets'][t]['splits']['test']}" for t in tasks)
    return [f"Merge table on the **pretrained base** (`{base_info['name']}`, sha256 `{base_info['sha256'][:16]}…`, "
            f"pretrain_base.md): {s['model']} at {s['input_size']} px, specialists r = 4 on Q/V, {s['epochs']} epochs, "
            f"lr {s['lr']} ({s['schedule']}, {s['warmup_steps']} warm-up steps), batch {s['batch_size']}; pipeline seeds "
            f"{', '.join(map(str, seeds))} (task i's specialist from seed + i). Cells: test accuracy, mean ± sd over the "
            f"{len(seeds)} seeds (sd across seeds, not a standard error). Data (train/val/test): {sizes}; the same data "
            f"and base for every seed. Normalised: mean over tasks of merged ÷ specialist (per seed, then averaged).", ""]


def to_markdown(res: dict) -> str:
    agg, tasks = res["aggregate"], res["runs"][0]["tasks"]
    lines = _header(res["runs"][0], res["seeds"], res["base"])
    lines += ["**Paper-faithful defaults**:", ""] + _table({**agg["reference"], **agg["defaults"]}, tasks)
    lines += ["", "**Med-LEGO's truncation threshold v** (v = 0.997 is the default row above; delta-avg = no truncation):", ""]
    lines += _table({"delta-avg": agg["defaults"]["delta-avg"], **agg["truncation"]} if "delta-avg" in agg["defaults"]
                    else agg["truncation"], tasks)
    tuned_seeds = [s for s, r in zip(res["seeds"], res["runs"]) if r.get("tuned")]
    lines += ["", "**Tuned on validation** (per seed, the grid point with the best mean normalised validation accuracy; "
              f"seeds with this block: {', '.join(map(str, tuned_seeds)) or 'none'}):", ""]
    lines += _table(agg["tuned"], tasks, tuned=True) if agg["tuned"] else ["Not run (`--no-tune`: on the shared 2-core "
                                                                          "machine the search is most of a seed's time)."]
    lines += ["", "**Reading** (computed from the numbers above):", ""] + [f"- {x}" for x in reading(agg, res.get("compare"))]
    if res.get("compare"):
        c = res["compare"]
        lines += ["", "**For comparison: the random-init base** (committed `merge_table.md`, one seed, 20 epochs, "
                  "2,400 training images per task), normalised accuracy at defaults / tuned:", "",
                  "| method | defaults | tuned |", "| --- | ---: | ---: |"]
        for name in list(c["reference"]) + list(c["defaults"]):
            row = c["reference"].get(name) or c["defaults"].get(name)
            tuned = c["tuned"].get(name)
            lines.append(f"| {name} | {mt._fmt(row.get('normalised_accuracy')) if row else '—'} | "
                         f"{mt._fmt(tuned['normalised_accuracy']) if tuned else '—'} |")
    h = res["hardware"]
    resumed = f" (seeds {', '.join(map(str, res['resumed']))} read from their earlier runs' JSON)" if res.get("resumed") else ""
    lines += ["", f"Ran {res['started']} in {res['seconds'] / 60:.1f} min{resumed} on {h.get('cpu', '?')} ({h.get('cores', '?')} cores, "
              f"{h.get('torch_threads', '?')} torch threads, no GPU); per seed: "
              + ", ".join(f"seed {s} {r['seconds'] / 60:.1f} min (started {r['started']['time']}, load average "
                          f"{r['started']['load_average'][0]:.1f})" for s, r in zip(res["seeds"], res["runs"]))
              + f"; load average at start {', '.join(f'{x:.1f}' for x in res['load_average'])}."]
    return "\n".join(lines) + "\n"


def _load_compare(path: Path | None) -> dict | None:
    """The random-init table to set beside (its JSON), when there is one."""
    if path is None or not path.exists():
        return None
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("reference", "defaults", "tuned", "tasks")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=None, help="pretrain_base.py's weights (default: "
                   "./medlego-results/pretrain_base.safetensors; rebuilt when missing)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--seeds", default="0,4,8", help="pipeline seeds (task i's specialist from seed + i)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="specialists' epochs (the base is pretrained: they adapt)")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    p.add_argument("--val-images", type=int, default=VAL_IMAGES)
    p.add_argument("--test-images", type=int, default=TEST_IMAGES)
    p.add_argument("--methods", help="comma-separated subset of the merge methods (default: all)")
    p.add_argument("--resume", action="store_true", help="read a seed from OUT/merge_table_pretrained_seed<s>.json "
                   "when an earlier run (same recipe) finished it")
    p.add_argument("--no-tune", action="store_true", help="skip the validation-tuned block (most of the time)")
    p.add_argument("--specialists", type=Path, metavar="DIR", help="keep seed s's specialists in DIR/seed<s>/ "
                   "(figure2_seeds.py reuses them; a rerun reuses files of the same recipe)")
    p.add_argument("--compare", type=Path, default=None, help="the random-init table's JSON to set beside "
                   "(default: OUT/merge_table.json when present)")
    p.add_argument("--threads", type=int, help="torch threads (default: min(2, cores))")
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    log = lambda m: print(m, flush=True)  # noqa: E731
    out, seeds = Path(a.out or results_dir()), [int(s) for s in a.seeds.split(",")]
    weights = ensure_base(a.base or default_weights_path(), log=log)
    base = load_base(a.model, weights)
    from medlego.runtime.adapter import sha256_hex

    res = {"seeds": seeds, "base": {"name": weights.name, "sha256": sha256_hex(weights.read_bytes())},
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(), "runs": [],
           "compare": _load_compare(a.compare or out / "merge_table.json")}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        datasets = make_data(Path(tmp), train=a.train_images, val=a.val_images, test=a.test_images)
        for seed in seeds:
            done = out / f"merge_table_pretrained_seed{seed}.json"
            if a.resume and done.exists():  # a finished seed of a stopped run (same recipe: the caller's word)
                log(f"== seed {seed}: read from {done} ==")
                res["runs"].append(json.loads(done.read_text()))
                res.setdefault("resumed", []).append(seed)
                continue
            save_dir = (a.specialists or Path(tmp) / "specialists") / f"seed{seed}"
            log(f"== seed {seed} ==")
            r = one_seed(base, datasets, seed, save_dir, a, log=log)
            write_json(r, done)
            res["runs"].append(r)
    res.update(aggregate=aggregate(res["runs"]), seconds=time.perf_counter() - t0, hardware=hardware())
    write_json(res, out / "merge_table_pretrained.json")
    (out / "merge_table_pretrained.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
