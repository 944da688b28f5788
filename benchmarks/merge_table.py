"""The paper's Table-1-style comparison: specialists and every merge method on every task.

Trains one specialist adapter per dataset (or takes given adapters), merges them train-free with
every method, and evaluates each result on each task's test split: rows = methods (and each
specialist on its own task), columns = tasks, cells = ACC / AUC. Writes merge_table.json and
merge_table.md.

    python -m medlego.benchmarks.merge_table                      # synthetic tasks, tiny ViT, a few CPU minutes
    python -m medlego.benchmarks.merge_table --model vit_base_patch16_224 --weights vit_base.safetensors \
        --data blood=bloodmnist.npz --data derma=dermamnist.npz ... --epochs 100     # real MedMNIST files
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medlego.jobs.datasets import load_dataset
from medlego.jobs.evaluate import evaluate_adapter
from medlego.runtime.adapter_merge import merge_adapters
from medlego.jobs.synthetic import make_synthetic_medmnist
from medlego.jobs.train import TrainConfig, train_adapter
from medlego.runtime.base import init_weights_file, load_base
from medlego.runtime.merging import METHODS
from medlego.runtime.model import AdaptedViT

from .common import hardware, write_json

# Synthetic stand-ins with the paper's variety: class counts, grey/RGB, one multi-label task.
SYNTHETIC = [
    {"task": "blood", "classes": 8, "rgb": True, "offset": 0},
    {"task": "derma", "classes": 7, "rgb": True, "offset": 8},
    {"task": "pneumonia", "classes": 2, "rgb": False, "offset": 3},
    {"task": "chest", "classes": 5, "rgb": False, "offset": 5, "multilabel": True},
]


def run(datasets: dict[str, Path], base, *, epochs: int, lr: float, seed: int = 0, max_rank: int = 64,
        methods=METHODS, log=print) -> dict:
    data = {t: load_dataset(p, input_size=base.input_size, seed=seed) for t, p in datasets.items()}
    specialists, train_info = {}, {}
    for task, d in data.items():
        t0 = time.perf_counter()
        res = train_adapter(base, d, TrainConfig(task=task, epochs=epochs, lr=lr, seed=seed, progress=False), log=lambda *_: None)
        specialists[task] = res.adapter
        train_info[task] = {"seconds": time.perf_counter() - t0, "best_epoch": res.best_epoch}
        log(f"specialist {task}: test acc {res.test['accuracy']:.3f} auc {res.test['auc']:.3f}")
    model = AdaptedViT(base)
    rows: dict[str, dict] = {}
    for task, ad in specialists.items():
        m = evaluate_adapter(base, ad, data[task], task, "test", model=model)
        rows[f"specialist: {task}"] = {task: {"accuracy": m["accuracy"], "auc": m["auc"]}}
    params = {"delta-avg": {"max_rank": max_rank}, "task-arithmetic": {"max_rank": max_rank}, "ties": {"max_rank": max_rank},
              "dare": {"max_rank": max_rank}, "magnitude-prune": {"max_rank": max_rank}, "magmax": {"max_rank": max_rank}}
    merged_info = {}
    sources = list(specialists.values())
    for method in methods:
        t0 = time.perf_counter()
        merged, report = merge_adapters(sources, method, params.get(method, {}))
        merged_info[method] = {"seconds": time.perf_counter() - t0, "max_rank": merged.max_rank,
                               "parameters": report["parameters"]}
        rows[method] = {}
        for task in data:
            m = evaluate_adapter(base, merged, data[task], task, "test", model=model)
            rows[method][task] = {"accuracy": m["accuracy"], "auc": m["auc"]}
        log(f"{method}: " + ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in rows[method].items()))
    return {"tasks": list(data), "rows": rows, "training": train_info, "merges": merged_info,
            "datasets": {t: {"source": d.source, "sha256": d.fingerprint, "splits": d.sizes(), "classes": d.num_classes,
                             "multilabel": d.multilabel} for t, d in data.items()},
            "settings": {"model": base.name, "input_size": base.input_size, "epochs": epochs, "lr": lr, "seed": seed,
                         "dense_methods_max_rank": max_rank, "ties_convention": "PEFT (per-tensor trim, sign by total, disjoint mean)"}}


def to_markdown(r: dict) -> str:
    tasks = r["tasks"]
    s = r["settings"]
    lines = [f"Specialists and merges on {', '.join(tasks)} ({s['model']} at {s['input_size']} px, {s['epochs']} epochs, "
             f"lr {s['lr']}); cells are test ACC / AUC. TIES convention: {s['ties_convention']}; dense-result methods "
             f"truncated to rank {s['dense_methods_max_rank']}.", "",
             "| method | " + " | ".join(tasks) + " | mean ACC |", "| --- | " + " | ".join("---" for _ in tasks) + " | ---: |"]
    for name, per in r["rows"].items():
        cells = [f"{per[t]['accuracy']:.3f} / {per[t]['auc']:.3f}" if t in per else "—" for t in tasks]
        accs = [per[t]["accuracy"] for t in tasks if t in per]
        mean = f"{sum(accs) / len(accs):.3f}" if len(accs) == len(tasks) else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--weights", help="base weights (default: a random-init base at 32 px)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH", help="a real dataset per task")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights = a.weights or init_weights_file(a.model, 0, Path(tmp) / "base.safetensors", img_size=32)
        base = load_base(a.model, weights)
        if a.data:
            datasets = {kv.split("=", 1)[0]: Path(kv.split("=", 1)[1]) for kv in a.data}
        else:
            datasets = {}
            for i, spec in enumerate(SYNTHETIC):
                datasets[spec["task"]] = make_synthetic_medmnist(
                    Path(tmp) / f"{spec['task']}.npz", classes=spec["classes"], rgb=spec["rgb"],
                    multilabel=spec.get("multilabel", False), pattern_offset=spec["offset"], seed=10 + i,
                    n_train=240, n_val=60, n_test=100)
        r = run(datasets, base, epochs=a.epochs, lr=a.lr, max_rank=a.max_rank)
    r["hardware"] = hardware()
    out = Path(a.out)
    write_json(r, out / "merge_table.json")
    (out / "merge_table.md").write_text(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
