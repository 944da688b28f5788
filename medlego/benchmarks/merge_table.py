"""The paper's Table-1-style comparison, built so that it can tell the methods apart.

One specialist adapter per task (each from its own seed), merged without data by every method, then
every merge evaluated on every task's test split. Three reference rows frame the methods:

* the best **linear probe** on the frozen base (no adapter, L2 chosen on validation): how much of
  each task the base alone solves; the synthetic tasks aim at ≤ chance + 0.15, and the table says where not;
* the **frozen base with the specialists' heads** (the "zero-shot" row of merging papers);
* the **specialists**, each on its own task: the reference of normalised accuracy.

Block 1: every method at its paper-faithful defaults. Block 2: every method that has α, λ, a
density, a drop rate or a threshold, at the grid point chosen on the *validation* splits (mean
normalised validation accuracy, jobs/merge.py — what ``medlego merge --tune-on`` runs). Cells are
test accuracy; the mean and the normalised accuracy (mean over tasks of merged ÷ specialist, as the
papers report) close each row. AUC is in the JSON.

    python -m medlego.benchmarks.merge_table                       # 4 synthetic tasks (merge_tasks.py), tiny ViT, CPU
    python -m medlego.benchmarks.merge_table --specialists DIR     # the same, specialists kept in DIR (figure2 --sources)
    python -m medlego.benchmarks.merge_table --tasks fibre-cross --specialists DIR --train-only   # one task's specialist only
    python -m medlego.benchmarks.merge_table --model vit_base_patch16_224 --weights vit_base.safetensors \\
        --data blood=bloodmnist.npz --data derma=dermamnist.npz ... --epochs 100 --lr 3e-4   # real MedMNIST files
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from medlego.jobs.datasets import load_dataset
from medlego.jobs.evaluate import evaluate_adapter
from medlego.jobs.merge import tune
from medlego.jobs.train import TrainConfig, train_adapter
from medlego.runtime.adapter import Adapter, load_adapter, save_adapter, sha256_hex
from medlego.runtime.adapter_merge import METHODS, defaults, merge_adapters, method
from medlego.runtime.base import init_weights_file, load_base
from medlego.runtime.convert import zero_lowrank
from medlego.runtime.errors import IncompatibleAdapterError
from medlego.runtime.model import AdaptedViT

from . import merge_tasks
from .common import OUT_HELP, hardware, write_json, results_dir

PROBE = "linear probe on the frozen base"
# Defaults of the synthetic benchmark (figure2.py trains its sources with the same). With 1,200 images per
# task at lr 2e-2 a specialist stayed near chance. With 2,400 at lr 5e-3 (cosine), lesion-ring (then 3 classes) left
# its plateau after ~5 of 12 epochs (0.86 val by epoch 7) and fibre-cross (4 classes) only after ~7, hence 20 epochs;
# the 4-class lesion-ring of issue 32 reached 0.83 val by epoch 7 and its best at epoch 13. On the shared 2-core
# machine one specialist then took 16–20 min at load average 2–7.
EPOCHS, LR, TRAIN_IMAGES = 20, 5e-3, 2400
HEADS = "frozen base + specialists' heads"
SPECIALISTS = "specialists (own task)"


def quiet_determinism() -> None:
    """jobs/train.py turns on deterministic algorithms on the CPU; PyTorch then also fills every new
    tensor with NaN, which costs ~10× here. Correct kernels never read that memory: results are equal."""
    torch.utils.deterministic.fill_uninitialized_memory = False


def _matches(adapter: Adapter, cfg: TrainConfig, data) -> bool:
    """Whether a saved specialist was trained by this run's recipe on this run's data (its provenance says so)."""
    prov = adapter.provenance or {}
    want = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "stop_after_epoch")}
    return (prov.get("kind") == "trained" and prov.get("hyperparameters") == want
            and prov.get("dataset", {}).get("sha256") == data.fingerprint and prov.get("init") == "fresh")


def train_specialists(base, data: dict, *, epochs: int, lr: float, batch_size: int, seed: int, schedule: str = "cosine",
                      warmup: int = 30, save_dir: Path | None = None, offsets: dict | None = None,
                      log=print) -> tuple[dict, dict]:
    """One adapter per task, task from seed + offsets[task] (default: its index; distinct seeds: distinct LoRA
    subspaces). With ``save_dir`` each is written to ``save_dir/<task>.safetensors`` (figure2.py's ``--sources``
    reuses them), and a file already there is reused instead of retrained when its provenance shows the same
    recipe (every training hyper-parameter, seed included), the same dataset (sha256) and the same base (a file made
    on another base is retrained over, not an error)."""
    adapters, info = {}, {}
    for i, (task, d) in enumerate(data.items()):
        t0 = time.perf_counter()
        s = seed + (offsets[task] if offsets else i)
        cfg = TrainConfig(task=task, epochs=epochs, lr=lr, batch_size=batch_size, seed=s, schedule=schedule,
                          warmup_steps=warmup, progress=False)
        path = Path(save_dir) / f"{task}.safetensors" if save_dir is not None else None
        if path is not None and path.exists():
            try:
                saved = load_adapter(path, expected_base=base.spec)
            except IncompatibleAdapterError:  # made on another base (e.g. before the base was rebuilt): retrain
                saved = None
            if saved is not None and _matches(saved, cfg, d):
                adapters[task] = saved
                info[task] = {"seed": s, "seconds": None, "best_epoch": saved.provenance["best_epoch"],
                              "val_accuracy": saved.provenance["val"]["accuracy"], "history": None,
                              "reused_file": str(path), "file_sha256": sha256_hex(path.read_bytes())}
                log(f"specialist {task} (seed {s}): reused {path} (same recipe and data), "
                    f"test acc {saved.provenance['test']['accuracy']:.3f}")
                continue
            log(f"specialist {task}: {path} was made by another recipe or data; retraining")
        res = train_adapter(base, d, cfg, log=lambda *_: None)
        adapters[task] = res.adapter
        info[task] = {"seed": s, "seconds": time.perf_counter() - t0, "best_epoch": res.best_epoch,
                      "val_accuracy": res.val["accuracy"], "history": res.history}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            info[task]["file_sha256"] = save_adapter(res.adapter, path)
        log(f"specialist {task} (seed {s}): test acc {res.test['accuracy']:.3f}, best epoch {res.best_epoch} "
            f"({info[task]['seconds'] / 60:.1f} min)")
    return adapters, info


def heads_only(sources: list[Adapter]) -> Adapter:
    """Every source's head on the frozen base: an adapter whose ΔW is zero everywhere."""
    merged, _ = merge_adapters(sources, "delta-avg")
    zero = tuple(zero_lowrank(merged.base.embed_dim) for _ in range(merged.depth))
    return replace(merged, q=zero, v=zero, provenance={"kind": "heads-only"})


def tune_method(base, sources: list[Adapter], name: str, data: dict, *, full_grid: bool = False) -> tuple[dict, dict]:
    """The method's parameters chosen on the validation splits (jobs/merge.py's ``tune``, what ``medlego merge
    --tune-on`` runs). A method with one parameter searches its grid. One with two (TIES, DARE, magnitude
    pruning and their core-space variants: a density or drop rate, and λ = ``scale``) searches the full
    product only with ``full_grid``. Otherwise it searches coordinate-wise: λ at the default density / drop
    rate, then the density / drop rate at the chosen λ (10–11 merges instead of 24–30; on 2 CPU cores every
    full-rank merge costs ~10 s of validation). The record keeps both stages."""
    grid = method(name).grid
    if full_grid or len(grid) == 1 or "scale" not in grid:
        return tune(base, sources, name, data, {}, progress=False, log=lambda *_: None)
    other = next(k for k in grid if k != "scale")
    first, rec1 = tune(base, sources, name, data, {other: defaults(name)[other]}, progress=False, log=lambda *_: None)
    params, rec2 = tune(base, sources, name, data, {"scale": first["scale"]}, progress=False, log=lambda *_: None)
    record = {**rec2, "protocol": f"coordinate search: scale at the default {other}, then {other} at the chosen scale",
              "grid": {k: list(v) for k, v in grid.items()}, "fixed": {},
              "stages": [{k: rec[k] for k in ("fixed", "grid", "trials", "chosen", "score")} for rec in (rec1, rec2)],
              "trials": rec1["trials"] + rec2["trials"], "chosen": {"scale": first["scale"], **rec2["chosen"]}}
    return params, record


def _scores(base, adapter, data: dict, model) -> dict:
    out = {}
    for t, d in data.items():
        m = evaluate_adapter(base, adapter, d, t, "test", model=model)  # one pass per task: accuracy and AUC
        out[t] = {"accuracy": m["accuracy"], "auc": m["auc"]}
    return out


def _row(cells: dict, specialist: dict | None) -> dict:
    accs = [c["accuracy"] for c in cells.values()]
    row = {"tasks": cells, "mean_accuracy": sum(accs) / len(accs)}
    if specialist:
        # a specialist at 0 counts as 0, as in jobs/merge.py's tuning score
        row["normalised_accuracy"] = sum(cells[t]["accuracy"] / specialist[t] if specialist[t] > 0 else 0.0
                                         for t in cells) / len(cells)
    return row


def run(datasets: dict[str, Path], base, *, epochs: int, lr: float, batch_size: int = 32, seed: int = 0,
        schedule: str = "cosine", warmup: int = 30, methods=METHODS, save_dir: Path | None = None, full_grid: bool = False,
        offsets: dict | None = None, train_only: bool = False, tune_methods: bool = True, log=print) -> dict | None:
    quiet_determinism()
    started = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()}
    data = {t: load_dataset(p, input_size=base.input_size, seed=seed) for t, p in datasets.items()}
    t0 = time.perf_counter()
    if train_only:  # only fill save_dir (e.g. one process per task), no table
        train_specialists(base, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule,
                          warmup=warmup, save_dir=save_dir, offsets=offsets, log=log)
        return None
    probes = {t: merge_tasks.linear_probe(base, d) for t, d in data.items() if not d.multilabel}
    for t, p in probes.items():
        log(f"linear probe {t}: test {p['test_accuracy']:.3f} (chance {1 / data[t].num_classes:.3f})")
    specialists, training = train_specialists(base, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                              schedule=schedule, warmup=warmup, save_dir=save_dir, offsets=offsets, log=log)
    sources = list(specialists.values())
    model = AdaptedViT(base)
    own = {t: _scores(base, specialists[t], {t: data[t]}, model)[t] for t in data}
    spec_acc = {t: own[t]["accuracy"] for t in data}
    reference = {
        PROBE: _row({t: {"accuracy": p["test_accuracy"], "auc": None} for t, p in probes.items()}, None) if probes else None,
        HEADS: _row(_scores(base, heads_only(sources), data, model), spec_acc),
        SPECIALISTS: _row(own, spec_acc),
    }
    blocks: dict[str, dict] = {"defaults": {}, "tuned": {}}
    for name in methods:
        t_m = time.perf_counter()
        merged, report = merge_adapters(sources, name)
        blocks["defaults"][name] = {**_row(_scores(base, merged, data, model), spec_acc), "parameters": report["parameters"],
                                    "max_rank": merged.max_rank, "merge_seconds": report["seconds"]}
        log(f"{name} (defaults): mean {blocks['defaults'][name]['mean_accuracy']:.3f} ({time.perf_counter() - t_m:.1f}s)")
        if not method(name).grid or not tune_methods:  # tuning is most of the time; a short run may skip it
            continue
        t_m = time.perf_counter()
        params, record = tune_method(base, sources, name, data, full_grid=full_grid)
        merged, report = merge_adapters(sources, name, params, tuning=record)
        blocks["tuned"][name] = {**_row(_scores(base, merged, data, model), spec_acc), "parameters": report["parameters"],
                                 "chosen": record["chosen"], "val_score": record["score"], "grid_points": len(record["trials"]),
                                 "max_rank": merged.max_rank, "tuning_seconds": time.perf_counter() - t_m}
        log(f"{name} (tuned {record['chosen']}): mean {blocks['tuned'][name]['mean_accuracy']:.3f} "
            f"({time.perf_counter() - t_m:.1f}s)")
    return {"tasks": list(data), "reference": reference, "defaults": blocks["defaults"], "tuned": blocks["tuned"],
            "probes": probes, "training": training, "started": started, "seconds": time.perf_counter() - t0,
            "finished_load_average": os.getloadavg(),
            "datasets": {t: {"source": d.source, "sha256": d.fingerprint, "splits": d.sizes(), "classes": d.num_classes,
                             "multilabel": d.multilabel} for t, d in data.items()},
            "settings": {"model": base.name, "input_size": base.input_size, "epochs": epochs, "lr": lr,
                         "batch_size": batch_size, "schedule": schedule, "warmup_steps": warmup, "seeds": {t: training[t]["seed"] for t in data},
                         "defaults": {m: defaults(m) for m in methods},
                         "tuning": "full product grids" if full_grid else "coordinate search for two-parameter methods"}}


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _table(rows: dict, tasks: list[str], tuned: bool = False) -> list[str]:
    """Rows of per-task test accuracy, mean, normalised, the merged rank (what serving it costs) and,
    for tuned rows, the choice and the grid's size."""
    head = "| method | " + " | ".join(tasks) + " | mean | normalised | max rank |" + (" chosen (grid points) |" if tuned else "")
    out = [head, "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: |" + (" --- |" if tuned else "")]
    for name, row in rows.items():
        if row is None:
            continue
        cells = [_fmt(row["tasks"][t]["accuracy"]) if t in row["tasks"] else "—" for t in tasks]
        line = (f"| {name} | " + " | ".join(cells) + f" | {_fmt(row['mean_accuracy'])} | {_fmt(row.get('normalised_accuracy'))} | "
                f"{row.get('max_rank', '—')} |")
        if tuned:
            line += " " + ", ".join(f"{k}={v:g}" for k, v in row["chosen"].items()) + f" ({row['grid_points']}) |"
        out.append(line)
    return out


def to_markdown(r: dict) -> str:
    tasks, s, h = r["tasks"], r["settings"], r.get("hardware", {})
    chance = {t: 1 / r["datasets"][t]["classes"] for t in tasks}
    probe_ok = all(p["test_accuracy"] <= chance[t] + 0.15 for t, p in r["probes"].items())
    spec_ok = all(r["reference"][SPECIALISTS]["tasks"][t]["accuracy"] >= 0.85 for t in tasks)
    over = ", ".join(f"{t} {p['test_accuracy']:.3f} > {chance[t] + 0.15:.3f}" for t, p in r["probes"].items()
                     if p["test_accuracy"] > chance[t] + 0.15)
    under = ", ".join(f"{t} {r['reference'][SPECIALISTS]['tasks'][t]['accuracy']:.3f}" for t in tasks
                      if r["reference"][SPECIALISTS]["tasks"][t]["accuracy"] < 0.85)
    n_reused = sum(1 for t in tasks if r["training"][t].get("reused_file"))
    reused = (f"{n_reused} of {len(tasks)} read from `--specialists DIR`, where an earlier run of this script with the same "
              f"recipe, seed and data had saved them (checked against each file's provenance). " if n_reused else "")
    sizes = ", ".join(f"{t} {r['datasets'][t]['splits']['test']}" for t in tasks)
    chances = ", ".join(f"{t} {chance[t]:.3f}" for t in tasks)
    seeds = ", ".join(str(v) for v in s["seeds"].values())
    se = max(0.5 / r["datasets"][t]["splits"]["test"] ** 0.5 for t in tasks)  # √(p(1−p)/n) at its largest, p = ½
    lines = [
        f"Specialists and merges on {', '.join(tasks)}: {s['model']} at {s['input_size']} px (base: "
        f"{'random init' if r.get('random_base') else 'given weights'}), each specialist r = 4 on Q/V, {s['epochs']} epochs, "
        f"lr {s['lr']} ({s['schedule']}, {s['warmup_steps']} warm-up steps), batch {s['batch_size']}, seeds {seeds}. Cells: test accuracy "
        f"({sizes} images; one standard error of a task's accuracy is at most ±{se:.3f}, of a {len(tasks)}-task mean "
        f"±{se / len(tasks) ** 0.5:.3f}). Normalised: mean over tasks of merged ÷ specialist.", "",
        f"Chance: {chances}. Linear probe ≤ chance + 0.15 on every task: "
        f"{'yes' if probe_ok else 'NO (' + over + ')'}; specialists ≥ 0.85 on every task: "
        f"{'yes' if spec_ok else 'NO (' + under + ')'}.", "",
        f"Specialists: {reused}Two-parameter methods in block 2: "
        f"{'the full product grid' if s.get('tuning') == 'full product grids' else 'λ (scale) searched at the default density / drop rate, then the density / drop rate at the chosen λ'}.", "",
        "**Paper-faithful defaults** (parameters in merge_table.json):", ""]
    lines += _table({**r["reference"], **r["defaults"]}, tasks)
    lines += ["", "**Tuned on validation** (the grid point with the best mean normalised validation accuracy; "
              "test never seen):", ""]
    lines += _table(r["tuned"], tasks, tuned=True)
    load0 = ", ".join(f"{x:.1f}" for x in r["started"]["load_average"])
    load1 = ", ".join(f"{x:.1f}" for x in r["finished_load_average"])
    lines += ["", f"Ran {r['started']['time']} in {r['seconds'] / 60:.1f} min on {h.get('cpu', '?')} ({h.get('cores', '?')} cores, "
              f"{h.get('torch_threads', '?')} torch threads, no GPU); load average at start {load0}, at end {load1}."]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--weights", help="base weights (default: a random-init base at 48 px)")
    p.add_argument("--base", metavar="FILE", help="a pretrained timm state_dict (pretrain_base.py's output); "
                   "rebuilt with pretrain_base's default recipe when FILE is missing")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH", help="a real dataset per task")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="task i's specialist trains from seed + i")
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="synthetic tasks: training images per task")
    p.add_argument("--val-images", type=int, default=150, help="synthetic tasks: validation images per task")
    p.add_argument("--test-images", type=int, default=300, help="synthetic tasks: test images per task")
    p.add_argument("--tasks", help="synthetic tasks: a comma-separated subset of " + ",".join(t.name for t in merge_tasks.TASKS)
                   + " (each keeps its data seed and its specialist's seed)")
    p.add_argument("--specialists", metavar="DIR", help="write each specialist to DIR/<task>.safetensors, and reuse one "
                   "already there if its provenance shows this recipe and data (figure2.py --weights DIR/base.safetensors "
                   "--sources DIR/*.safetensors reuses them; the random-init base is written there too)")
    p.add_argument("--train-only", action="store_true", help="train (or find) the specialists in --specialists DIR, no table")
    p.add_argument("--full-grid", action="store_true", help="tune two-parameter methods over their full product grid "
                   "(default: λ, then the density / drop rate at the chosen λ)")
    p.add_argument("--threads", type=int, help="torch threads (default: min(2, cores))")
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    return p


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.base:  # why a second option: --weights must exist, --base is rebuilt (the weights are not committed)
        from .pretrain_base import ensure_base

        a.weights = str(ensure_base(a.base, log=lambda m: print(m, flush=True)))
    if a.train_only and not a.specialists:
        p.error("--train-only needs --specialists DIR (where the specialists are kept)")
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = Path(a.specialists) if a.specialists else None
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
        weights = a.weights or init_weights_file(a.model, 0, (save_dir or Path(tmp)) / "base.safetensors",
                                                 img_size=merge_tasks.SIZE)
        base = load_base(a.model, weights)
        if a.data:
            datasets = {kv.split("=", 1)[0]: Path(kv.split("=", 1)[1]) for kv in a.data}
        else:
            chosen = a.tasks.split(",") if a.tasks else [t.name for t in merge_tasks.TASKS]
            unknown = set(chosen) - {t.name for t in merge_tasks.TASKS}
            if unknown:
                p.error(f"unknown task(s) {', '.join(sorted(unknown))}")
            offsets = {t.name: i for i, t in enumerate(merge_tasks.TASKS) if t.name in chosen}
            datasets = {t.name: merge_tasks.make_marked_dataset(Path(tmp) / f"{t.name}.npz", t, n_train=a.train_images,
                                                                n_val=a.val_images, n_test=a.test_images, seed=100 + i)
                        for i, t in enumerate(merge_tasks.TASKS) if t.name in chosen}
        r = run(datasets, base, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, schedule=a.schedule,
                warmup=a.warmup, save_dir=save_dir, full_grid=a.full_grid, offsets=None if a.data else offsets,
                train_only=a.train_only, log=lambda m: print(m, flush=True))
        if r is None:
            return 0
    r["hardware"] = hardware()
    r["random_base"] = a.weights is None
    out = Path(a.out or results_dir())
    write_json(r, out / "merge_table.json")
    (out / "merge_table.md").write_text(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
