"""Figure 2 on the pretrained base over several pipeline seeds: mean ± sd curves.

For each seed s: the sources are lesion-ring's and gland-square's specialists of merge_table_seeds'
seed s (reused from ``--specialists DIR/seed<s>/`` when their provenance shows the same recipe,
trained and saved there otherwise), and every arm of figure2.py (fresh r = 4 and r = 16, Med-LEGO,
Med-LEGO capped at r = 4, PEM) fine-tunes the new task ``lesion-texture`` from seed s. So a seed
varies the sources, the merged start and the fine-tuning alike; the base and the data do not.

    python -m medlego.benchmarks.figure2_seeds --base medlego-results/pretrain_base.safetensors \\
        --specialists medlego-results/specialists --out benchmarks/results

Writes figure2_pretrained.{json,md,png} (after every seed, so a stopped run keeps the seeds it finished).
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
from medlego.runtime.adapter import sha256_hex
from medlego.runtime.base import load_base

from . import figure2, merge_tasks
from . import merge_table as mt
from .common import OUT_HELP, hardware, results_dir, write_json
from . import merge_table_seeds as mts
from .merge_table_seeds import make_data
from .pretrain_base import default_weights_path, ensure_base

SOURCES = ("lesion-ring", "gland-square")  # the committed Figure 2's sources: a ring marker, gland-square's textures


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def combine(per_seed: list[dict]) -> dict:
    """One figure2-shaped result whose arms hold every seed's run, with mean ± sd per epoch and of the test."""
    first = per_seed[0]
    arms = {}
    for arm in first["arms"]:
        runs = [run for r in per_seed if arm in r["arms"] for run in r["arms"][arm]["runs"]]
        curves = list(zip(*(run["val_curve"] for run in runs)))
        tests = [run["test_accuracy"] for run in runs]
        arms[arm] = {**{k: first["arms"][arm][k] for k in ("max_rank", "lora_params")}, "runs": runs,
                     "val_mean": [statistics.mean(c) for c in curves], "val_sd": [_sd(list(c)) for c in curves],
                     "test_mean": statistics.mean(tests), "test_sd": _sd(tests)}
    return {**{k: first[k] for k in ("new_task", "epochs", "lr", "batch_size", "dataset")}, "arms": arms,
            "seeds": [s for r in per_seed for s in r["seeds"]]}


def to_markdown(r: dict) -> str:
    n, e = len(r["seeds"]), r["epochs"]
    lines = [f"Figure 2 on the **pretrained base** (`{r['base']['name']}`, sha256 `{r['base']['sha256'][:16]}…`): new task "
             f"`{r['new_task']['name']}` (train/val/test {r['dataset']['splits']['train']}/{r['dataset']['splits']['val']}/"
             f"{r['dataset']['splits']['test']} images), {e} epochs, lr {r['lr']} (cosine, 30 warm-up steps), batch "
             f"{r['batch_size']}; sources {', '.join(f'`{s}`' for s in SOURCES)} trained {r['source_epochs']} epochs on "
             f"{r['source_train_images']} images each; pipeline seeds {', '.join(map(str, r['seeds']))} (a seed sets the "
             f"sources, hence the merged start, and the fine-tuning). Mean ± sd over the {n} seeds.", "",
             "| start | max rank | LoRA params | test acc (best val ckpt) | "
             + " | ".join(f"val acc after epoch {k}" for k in range(1, e + 1)) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in range(e)) + " |"]
    for arm, a in r["arms"].items():
        lines.append(f"| {arm} | {a['max_rank']} | {a['lora_params']:,} | {a['test_mean']:.3f} ± {a['test_sd']:.3f} | "
                     + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(a["val_mean"], a["val_sd"])) + " |")
    h = r["hardware"]
    lines += ["", f"Curves: `figure2_pretrained.png` (mean ± sd bands). Ran {r['started']} in {r['seconds'] / 60:.1f} min "
              f"on {h.get('cpu', '?')} ({h.get('torch_threads', '?')} torch threads, no GPU); load average at start "
              f"{', '.join(f'{x:.1f}' for x in r['load_average'])}."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = range(1, r["epochs"] + 1)
    for arm, a in r["arms"].items():
        line, = ax.plot(epochs, a["val_mean"], marker="o", ms=3,
                        label=f"{arm} (test {a['test_mean']:.3f} ± {a['test_sd']:.3f})")
        ax.fill_between(epochs, [m - s for m, s in zip(a["val_mean"], a["val_sd"])],
                        [m + s for m, s in zip(a["val_mean"], a["val_sd"])], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation accuracy",
           title=f"'{r['new_task']['name']}' on the pretrained base: mean ± sd over {len(r['seeds'])} seeds")
    ax.axhline(1 / r["new_task"]["classes"], color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sources_for(base, seed: int, a, tmp: Path, log) -> list:
    """Seed s's two source specialists, with merge_table_seeds' recipe (so that its saved files are reused)."""
    data = {t: load_dataset(p, input_size=base.input_size, seed=seed)
            for t, p in make_data(tmp, train=a.source_train_images, val=a.val_images, test=a.test_images,
                                  tasks=list(SOURCES)).items()}
    offsets = {t.name: i for i, t in enumerate(merge_tasks.TASKS)}
    save_dir = (a.specialists or tmp / "specialists") / f"seed{seed}"
    specialists, _ = mt.train_specialists(base, data, epochs=a.source_epochs, lr=a.lr, batch_size=32, seed=seed,
                                          save_dir=save_dir, offsets=offsets, log=log)
    return [specialists[t] for t in SOURCES]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=None, help="pretrain_base.py's weights (rebuilt when missing)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--seeds", default="0,4,8")
    p.add_argument("--specialists", type=Path, metavar="DIR", help="merge_table_seeds' DIR (its seed<s>/ files)")
    p.add_argument("--source-epochs", type=int, default=mts.EPOCHS, help="the sources' recipe: merge_table_seeds' (so its files are reused)")
    p.add_argument("--source-train-images", type=int, default=mts.TRAIN_IMAGES)
    p.add_argument("--val-images", type=int, default=mts.VAL_IMAGES)
    p.add_argument("--test-images", type=int, default=mts.TEST_IMAGES)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=mts.LR, help="the sources' and the new task's learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-images", type=int, default=400, help="new task: training images")
    p.add_argument("--threads", type=int, help="torch threads (default: min(2, cores))")
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    log = lambda m: print(m, flush=True)  # noqa: E731
    out, seeds = Path(a.out or results_dir()), [int(s) for s in a.seeds.split(",")]
    weights = ensure_base(a.base or default_weights_path(), log=log)
    base = load_base(a.model, weights)
    head = {"base": {"name": weights.name, "sha256": sha256_hex(weights.read_bytes())}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg(), "source_epochs": a.source_epochs, "source_train_images": a.source_train_images}
    t0, per_seed, r = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory() as tmp:
        new = load_dataset(merge_tasks.make_marked_dataset(Path(tmp) / "new.npz", figure2.NEW_TASK, n_train=a.train_images,
                                                           n_val=a.val_images, n_test=a.test_images, seed=200),
                           input_size=base.input_size)
        for seed in seeds:
            sources = sources_for(base, seed, a, Path(tmp), log)
            per_seed.append(figure2.run(base, sources, new, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                                        seeds=[seed], log=log))
            r = {**combine(per_seed), **head, "seconds": time.perf_counter() - t0, "hardware": hardware()}
            write_json(r, out / "figure2_pretrained.json")
            (out / "figure2_pretrained.md").write_text(to_markdown(r))
            plot(r, out / "figure2_pretrained.png")
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
