"""The paper's Figure 2: a new task fine-tuned from a merged adapter vs from a fresh start, same budget.

The source specialists are the merge table's synthetic tasks (trained here, or ``--sources``: the files of
``merge_table --specialists DIR``).
The new task (``NEW_TASK``) needs skills they hold between them — a ring marker to attend to
(lesion-ring) and gland-square's textures to read — in a combination none of them was trained on. Every arm trains with the same data, epochs, learning rate, batch and
seeds; only the start differs (``medlego train --init-adapter`` for the merged starts):

* fresh r = 4: E = 0, the paper's baseline start;
* fresh r = 16: as many trainable factors as the Med-LEGO start, so capacity is not the difference;
* Med-LEGO (v = 0.997): the merged factors, each matrix at its merged rank (≤ 16);
* Med-LEGO capped at r = 4: the merged factors at the fresh start's size;
* PEM composition (r = 4): the factor-level merge the paper compares.

Curves: validation accuracy after every epoch (the training job evaluates validation each epoch;
test only at the chosen checkpoint), mean over seeds with the min–max band. Table: the test accuracy
of each run's best-validation checkpoint, and validation accuracy after the first epochs.

    python -m medlego.benchmarks.figure2 [--epochs 6] [--seeds 0,1] [--weights DIR/base.safetensors --sources DIR/*.safetensors]

(DIR: the merge table's ``--save-specialists DIR``, so that both experiments share one set of specialists.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medlego.jobs.datasets import load_dataset
from medlego.jobs.train import TrainConfig, train_adapter
from medlego.runtime.adapter import load_adapter
from medlego.runtime.adapter_merge import merge_adapters
from medlego.runtime.base import init_weights_file, load_base

from . import merge_tasks
from .common import OUT_HELP, hardware, write_json, results_dir
from .merge_table import EPOCHS, LR, TRAIN_IMAGES, quiet_determinism, train_specialists

NEW_TASK = merge_tasks.MarkedTask("lesion-texture", "ring", "orientation", 3, angle=0.8, freq=3.5)
CHECKPOINTS = (1, 2, 3, 5)  # epochs at which the table reports validation accuracy


def starts(sources: list) -> dict[str, tuple[int, object]]:
    """arm → (rank for a fresh start, or the init adapter)."""
    return {  # the main comparison first: a stopped run keeps the arms it finished
        "fresh r=4": (4, None),
        "Med-LEGO (v=0.997)": (0, merge_adapters(sources, "med-lego")[0]),
        "PEM composition (r=4)": (0, merge_adapters(sources, "pem")[0]),
        "fresh r=16": (16, None),
        "Med-LEGO capped at r=4": (0, merge_adapters(sources, "med-lego", {"max_rank": 4})[0]),
    }


def run(base, sources: list, data, *, epochs: int, lr: float, batch_size: int, seeds: list[int], log=print,
        on_arm=None) -> dict:
    """``on_arm(partial result)`` after each arm (main writes the files then: a stopped run leaves the arms it finished)."""
    quiet_determinism()
    arms, planned = {}, starts(sources)
    for arm, (rank, init) in planned.items():
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = TrainConfig(task=NEW_TASK.name, epochs=epochs, lr=lr, batch_size=batch_size, rank=rank or 4, seed=seed,
                              schedule="cosine", warmup_steps=30, progress=False)
            res = train_adapter(base, data, cfg, init=(init, {"name": arm}) if init is not None else None,
                                log=lambda *_: None)
            runs.append({"seed": seed, "val_curve": [h["val_accuracy"] for h in res.history], "best_epoch": res.best_epoch,
                         "test_accuracy": res.test["accuracy"], "test_auc": res.test["auc"],
                         "seconds": time.perf_counter() - t0})
            log(f"{arm}, seed {seed}: test {res.test['accuracy']:.3f} (best epoch {res.best_epoch}), "
                f"val curve {' '.join(f'{v:.2f}' for v in runs[-1]['val_curve'])}")
        tests = [r["test_accuracy"] for r in runs]
        arms[arm] = {"runs": runs, "max_rank": init.max_rank if init is not None else rank,
                     "lora_params": init.lora_params if init is not None else 2 * base.depth * rank * (2 * base.embed_dim + 1),
                     "test_mean": statistics.mean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0}
        result = {"new_task": NEW_TASK.__dict__, "arms": arms, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                  "seeds": seeds, "dataset": {"sha256": data.fingerprint, "splits": data.sizes()}, "arms_planned": list(planned)}
        if on_arm is not None:
            on_arm(result)
    return result


def _mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.mean(c) for c in zip(*(r["val_curve"] for r in runs))]


def to_markdown(r: dict) -> str:
    lines = [f"New task `{r['new_task']['name']}` (marker {r['new_task']['marker']}, {r['new_task']['texture']} texture, "
             f"{r['new_task']['classes']} classes; train/val/test {r['dataset']['splits']['train']}/"
             f"{r['dataset']['splits']['val']}/{r['dataset']['splits']['test']} images) fine-tuned for {r['epochs']} epochs, "
             f"lr {r['lr']} (cosine, 30 warm-up steps), batch {r['batch_size']}, seed{'s' if len(r['seeds']) > 1 else ''} {', '.join(map(str, r['seeds']))} — the same for every start.", "",
             "| start | max rank | LoRA params | test acc (best val ckpt), mean ± sd | "
             + " | ".join(f"val acc after epoch {e}" for e in CHECKPOINTS if e <= r["epochs"]) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for e in CHECKPOINTS if e <= r["epochs"]) + " |"]
    for arm, a in r["arms"].items():
        curve = _mean_curve(a["runs"])
        test = f"{a['test_mean']:.3f} ± {a['test_sd']:.3f}" if len(a["runs"]) > 1 else f"{a['test_mean']:.3f} (one seed)"
        lines.append(f"| {arm} | {a['max_rank']} | {a['lora_params']:,} | {test} | "
                     + " | ".join(f"{curve[e - 1]:.3f}" for e in CHECKPOINTS if e <= r["epochs"]) + " |")
    missing = [a for a in r.get("arms_planned", r["arms"]) if a not in r["arms"]]
    if missing:
        lines += ["", f"**Partial run**: the arms {', '.join(missing)} did not run (the run was stopped after "
                      f"{len(r['arms'])} of {len(r['arms_planned'])} arms)."]
    h = r.get("hardware", {})
    load = ", ".join(f"{x:.1f}" for x in r["load_average"])
    lines += ["", f"Sources: {r['sources']}. Curves: `figure2.png`. Ran {r['started']} in {r['seconds'] / 60:.1f} min on "
              f"{h.get('cpu', '?')} ({h.get('torch_threads', '?')} torch threads, no GPU); load average at start {load}."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = range(1, r["epochs"] + 1)
    for arm, a in r["arms"].items():
        curves = [run["val_curve"] for run in a["runs"]]
        line, = ax.plot(epochs, _mean_curve(a["runs"]), marker="o", ms=3, label=f"{arm} (test {a['test_mean']:.3f})")
        ax.fill_between(epochs, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=f"New task '{r['new_task']['name']}': merged start vs fresh start")
    ax.axhline(1 / r["new_task"]["classes"], color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="center right")  # merged starts above, fresh ones below
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--weights", help="base weights (default: the merge table's random-init base at 48 px)")
    p.add_argument("--base", metavar="FILE", help="a pretrained timm state_dict (pretrain_base.py's output); "
                   "rebuilt with pretrain_base's default recipe when FILE is missing")
    p.add_argument("--sources", nargs="+", metavar="FILE", help="source adapters (default: train the four synthetic specialists)")
    p.add_argument("--source-epochs", type=int, default=EPOCHS)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-images", type=int, default=1200, help="new task: training images")
    p.add_argument("--threads", type=int, help="torch threads (default: min(2, cores))")
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    a = p.parse_args(argv)
    if a.base:  # why a second option: --weights must exist, --base is rebuilt (the weights are not committed)
        from .pretrain_base import ensure_base

        a.weights = str(ensure_base(a.base, log=lambda m: print(m, flush=True)))
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    started, load, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg(), time.perf_counter()
    quiet_determinism()
    with tempfile.TemporaryDirectory() as tmp:
        weights = a.weights or init_weights_file(a.model, 0, Path(tmp) / "base.safetensors", img_size=merge_tasks.SIZE)
        base = load_base(a.model, weights)
        if a.sources:
            sources = [load_adapter(s, expected_base=base.spec) for s in a.sources]
        else:
            data = {t.name: load_dataset(merge_tasks.make_marked_dataset(Path(tmp) / f"{t.name}.npz", t, n_train=TRAIN_IMAGES,
                                                                         n_val=150, n_test=300, seed=100 + i),
                                         input_size=base.input_size)
                    for i, t in enumerate(merge_tasks.TASKS)}
            sources = list(train_specialists(base, data, epochs=a.source_epochs, lr=a.lr, batch_size=a.batch_size, seed=0,
                                             log=print)[0].values())
        new = load_dataset(merge_tasks.make_marked_dataset(Path(tmp) / "new.npz", NEW_TASK, n_train=a.train_images, n_val=150,
                                                           n_test=300, seed=200), input_size=base.input_size)
        out = Path(a.out or results_dir())
        sources_text = (", ".join(f"`{Path(f).name}`" for f in a.sources) if a.sources
                        else f"the four synthetic specialists, {a.source_epochs} epochs each")

        def write(r: dict) -> None:
            r.update(hardware=hardware(), started=started, load_average=load, seconds=time.perf_counter() - t0,
                     sources=sources_text)
            write_json(r, out / "figure2.json")
            (out / "figure2.md").write_text(to_markdown(r))
            plot(r, out / "figure2.png")

        r = run(base, sources, new, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                seeds=[int(s) for s in a.seeds.split(",")], log=lambda m: print(m, flush=True), on_arm=write)
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
