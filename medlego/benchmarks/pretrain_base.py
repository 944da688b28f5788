"""A pretrained base for the merge experiments: vit_tiny at 48 px, trained on a broad synthetic corpus.

Why: on a random-init base a rank-4 adapter has to *learn* features, while the papers' adapters
*adapt* a pretrained ViT (Med-LEGO, MeLo: ImageNet weights). This script makes the second regime
reproducible on a CPU: it trains every weight of vit_tiny (48 px, 3 × 3 patches of 16 px) on
procedural images whose classes are disjoint from the merge tasks (merge_tasks.TASKS) and from
Figure 2's new task — other texture generators, and no marker at all.

Each image is a 3 × 3 mosaic of this module's textures: square-wave stripes (6 orientations × 2
frequencies, none of the merge tasks' sine gratings), checkerboards, dot lattices, concentric rings,
spokes, blurred noise and flat cells (25 classes). 4–6 cells hold the dominant class, which the class
token must name; every patch token names its own cell's class. Nothing marks a cell: the base learns
textures, not the merge tasks' skill of reading the texture under a marker. (The earlier corpus labelled
the texture under one of five markers; its base solved two of the four merge tasks by a linear probe,
0.993 and 0.973, and left the specialists nothing to adapt — pretrain_base.md.)

After training, a linear probe (merge_tasks.linear_probe, the merge table's) on each merge task says
how much the base alone solves: the target is ≥ chance + 0.20 and clearly below the specialists.
Deterministic from ``--seed`` (data stream and initialisation) at a fixed thread count.

    python -m medlego.benchmarks.pretrain_base --out benchmarks/results      # weights: ./medlego-results/pretrain_base.safetensors
    python -m medlego.benchmarks.merge_table --base ./medlego-results/pretrain_base.safetensors ...
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from medlego.jobs.datasets import load_dataset
from medlego.runtime.adapter import atomic_write, sha256_hex
from medlego.runtime.base import load_base
from medlego.runtime.vit import create, typed

from . import merge_tasks
from .common import OUT_HELP, hardware, results_dir, write_json

CELL, GRID, SIZE = merge_tasks.CELL, merge_tasks.GRID, merge_tasks.SIZE
_yy, _xx = np.mgrid[0:CELL, 0:CELL].astype(np.float64)


@dataclass
class Recipe:
    model: str = "vit_tiny_patch16_224"
    # 50 steps: of the runs at 30, 35, 40 and 50 steps (pretrain_base.md), the first whose probe reached chance + 0.20
    # on every merge task with a margin (nucleus-dot last: 0.690, 0.690, 0.725, 0.760); the 3-class lesion-ring of
    # then probed 0.93–0.995 at every length, which is why that task, not this recipe, changed (merge_tasks.TASKS)
    steps: int = 50
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    seed: int = 0
    cell_weight: float = 0.5  # the per-cell loss (every patch token names its own cell's texture)
    threads: int = 1  # why 1: on a shared, oversubscribed 2-core machine two OpenMP threads mostly wait for each other
    probe_train: int = 1000  # per merge task: the probe's training images (the merge table's data sizes, so that the
    probe_val: int = 100  # record's probe is the table's probe row)
    probe_test: int = 200


def default_weights_path() -> Path:
    """Outside benchmarks/results and git-ignored (/medlego-results/): the weights are rebuilt, never committed."""
    return Path.cwd() / "medlego-results" / "pretrain_base.safetensors"


def _texture_classes() -> list[tuple]:
    """The corpus's 25 texture classes, as (generator, parameter, parameter)."""
    stripes = [("stripes", math.pi * k / 6 + math.pi / 12, f) for f in (2.5, 6.0) for k in range(6)]
    return stripes + [("checker", 2, 0), ("checker", 4, 0), ("checker", 2, 1), ("checker", 4, 1),
                      ("dots", 4, 0), ("dots", 8, 0), ("rings", 1.5, 0), ("rings", 3.0, 0), ("spokes", 4, 0),
                      ("spokes", 8, 0), ("noise", 1, 0), ("noise", 3, 0), ("flat", 0, 0)]


TEXTURES = _texture_classes()


def _texture(rng, kind: str, a: float, b: float) -> np.ndarray:
    """One 16-px cell of a texture class, in [-1, 1], random phase / offset (why: the class, not the pixels)."""
    y, x = _yy + rng.uniform(0, 16), _xx + rng.uniform(0, 16)
    if kind == "stripes":  # square wave: not the merge tasks' sine gratings
        return np.sign(np.sin(2 * np.pi * b * (np.cos(a) * x + np.sin(a) * y) / CELL))
    if kind == "checker":
        u, v = ((x + y) / 1.414, (x - y) / 1.414) if b else (x, y)
        return np.where((np.floor(u / a) + np.floor(v / a)) % 2 == 0, 1.0, -1.0)
    if kind == "dots":
        return 2 * np.exp(-(((x % a) - a / 2) ** 2 + ((y % a) - a / 2) ** 2) / 1.5) - 1
    cy, cx = rng.uniform(5, 11, 2)
    if kind == "rings":
        return np.sin(2 * np.pi * a * np.hypot(_yy - cy, _xx - cx) / 8 + rng.uniform(0, 2 * np.pi))
    if kind == "spokes":
        return np.sin(a * np.arctan2(_yy - cy, _xx - cx) + rng.uniform(0, 2 * np.pi))
    if kind == "noise":
        n = rng.standard_normal((CELL + 4 * int(a), CELL + 4 * int(a)))
        k = np.ones(2 * int(a) + 1) / (2 * int(a) + 1)  # box blur: a = 1 fine, 3 coarse grain
        n = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, n)
        n = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, n)[2 * int(a):2 * int(a) + CELL, 2 * int(a):2 * int(a) + CELL]
        return np.clip(n / (n.std() + 1e-6), -2, 2) / 2
    return np.full((CELL, CELL), rng.choice([-1.0, 1.0]))


def corpus_batch(rng, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images [n, 3, 48, 48] in [0, 1], their labels (the image's dominant texture class) and every cell's
    class [n, 9].
    Each image is a 3 × 3 mosaic of this module's textures: 4–6 cells of the dominant class, the other cells
    of distinct other classes, at random places, contrasts and phases. No marker, no marked cell: nothing
    says *which* cell matters, so the base learns textures (per cell and pooled) but not the merge tasks'
    skill of binding a marker to the texture under it — that is left for the adapters."""
    images, labels = np.empty((n, SIZE, SIZE)), np.empty(n, dtype=np.int64)
    cells = np.empty((n, GRID * GRID), dtype=np.int64)
    for i in range(n):
        dominant = int(rng.integers(len(TEXTURES)))
        k = int(rng.integers(4, 7))
        others = rng.choice(np.delete(np.arange(len(TEXTURES)), dominant), size=GRID * GRID - k, replace=False)
        classes = rng.permutation(np.concatenate([np.full(k, dominant), others]))
        img = 0.5 + 0.03 * rng.standard_normal((SIZE, SIZE))
        for c, t in enumerate(classes):
            y, x = divmod(c, GRID)
            cell = 0.18 * rng.uniform(0.4, 1.6) * _texture(rng, *TEXTURES[int(t)])
            img[y * CELL:(y + 1) * CELL, x * CELL:(x + 1) * CELL] += cell
        images[i], labels[i], cells[i] = np.clip(img, 0, 1), dominant, classes
    x = torch.from_numpy((images * 255).round() / 255).float().unsqueeze(1).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(labels), torch.from_numpy(cells)


def _loss(model, cell_head, x, y, cells, cell_weight: float):
    """Class token → the image's dominant texture; each patch token → its own cell's texture (why: 9 more
    labels per image, so the trunk learns local texture features in a few thousand images)."""
    tokens = model.forward_features((x - 0.5) / 0.5)  # the base's preprocess (timm's vit_tiny: mean = std = 0.5)
    logits = model.forward_head(tokens)
    per_cell = cell_head(tokens[:, model.num_prefix_tokens:])  # [n, 9, classes]
    aux = torch.nn.functional.cross_entropy(per_cell.flatten(0, 1), cells.flatten())
    return torch.nn.functional.cross_entropy(logits, y) + cell_weight * aux, logits


def train(recipe: Recipe, log=print) -> tuple[dict, list[dict]]:
    """Every weight of the ViT (plus a 25-class head), AdamW, linear warm-up then cosine; fresh images every
    step from one seeded stream (why: no epoch repeats, so no memorising; deterministic at fixed threads)."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = create(recipe.model, pretrained=False, img_size=SIZE, num_classes=len(TEXTURES))
    cell_head = torch.nn.Linear(typed(model).embed_dim, len(TEXTURES))
    params = list(model.parameters()) + list(cell_head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm, total = recipe.warmup_steps, recipe.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    history, t0, run_loss, run_acc = [], time.perf_counter(), 0.0, 0.0
    model.train()
    for step in range(total):
        x, y, cells = corpus_batch(rng, recipe.batch_size)
        loss, logits = _loss(model, cell_head, x, y, cells, recipe.cell_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(1) == y).float().mean())
        if (step + 1) % 10 == 0 or step + 1 == total:
            k = 10 if (step + 1) % 10 == 0 else (step + 1) % 10
            history.append({"step": step + 1, "train_loss": run_loss / k, "train_accuracy": run_acc / k,
                            "seconds": time.perf_counter() - t0})
            log(f"step {step + 1}/{total}: loss {run_loss / k:.3f}, acc {run_acc / k:.3f} "
                f"({(step + 1) * recipe.batch_size / (time.perf_counter() - t0):.0f} img/s)")
            run_loss, run_acc = 0.0, 0.0
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    return sd, history


def probe_merge_tasks(weights: Path, recipe: Recipe, tmp: Path) -> tuple[dict, str]:
    """The merge table's linear probe on every merge task (same data seeds as merge_table: 100 + i), and the
    base's fingerprint (sha256 over its tensors: what adapters record as their base)."""
    base = load_base(recipe.model, weights)
    out = {}
    for i, t in enumerate(merge_tasks.TASKS):
        path = merge_tasks.make_marked_dataset(tmp / f"{t.name}.npz", t, n_train=recipe.probe_train,
                                               n_val=recipe.probe_val, n_test=recipe.probe_test, seed=100 + i)
        p = merge_tasks.linear_probe(base, load_dataset(path, input_size=base.input_size))
        out[t.name] = {**p, "chance": 1 / t.classes, "margin_over_chance": p["test_accuracy"] - 1 / t.classes}
    return out, base.spec.fingerprint


def build(weights: Path, recipe: Recipe, *, log=print) -> dict:
    """Train, write the weights (safetensors, timm names, no head), probe; the record of the run."""
    from safetensors.torch import save

    torch.set_num_threads(recipe.threads)  # fixed: results depend on it
    started, load0, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg(), time.perf_counter()
    sd, history = train(recipe, log=log)
    train_seconds = time.perf_counter() - t0
    blob = save(sd, metadata={"model": recipe.model, "seed": str(recipe.seed), "recipe": "medlego.benchmarks.pretrain_base"})
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, blob)
    with tempfile.TemporaryDirectory() as tmp:
        probes, fingerprint = probe_merge_tasks(weights, recipe, Path(tmp))
    for t, p in probes.items():
        log(f"probe {t}: test {p['test_accuracy']:.3f} (chance {p['chance']:.3f})")
    return {"weights": str(weights), "sha256": sha256_hex(blob), "fingerprint": fingerprint, "recipe": asdict(recipe), "input_size": SIZE,
            "corpus": {"textures": [list(t) for t in TEXTURES], "images_seen": recipe.steps * recipe.batch_size},
            "history": history, "probes": probes, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0, "started": started, "load_average": {"start": load0, "end": os.getloadavg()},
            "hardware": hardware()}


def ensure_base(weights: str | Path, recipe: Recipe | None = None, *, log=print) -> Path:
    """The weights file, built with the default recipe (or ``recipe``) when missing: the merge table and
    Figure 2 take ``--base FILE`` and rebuild it rather than fail (the weights are not committed)."""
    p = Path(weights)
    if not p.exists():
        log(f"{p} is missing: pretraining it (python -m medlego.benchmarks.pretrain_base)")
        build(p, recipe or Recipe(), log=log)
    return p


def criterion(r: dict) -> dict:
    """Each probe ≥ chance + 0.20 (the base helps); "clearly below the specialists" is read in the merge table."""
    return {t: p["margin_over_chance"] >= 0.20 - 1e-9 for t, p in r["probes"].items()}  # 0.7 - 0.5 is 0.19999… in floats


def to_markdown(r: dict) -> str:
    rc, ok = r["recipe"], criterion(r)
    lines = [f"Pretrained base: {rc['model']} at {r['input_size']} px, every weight trained for {rc['steps']} steps × batch "
             f"{rc['batch_size']} = {r['corpus']['images_seen']:,} fresh synthetic images (AdamW lr {rc['lr']}, weight decay "
             f"{rc['weight_decay']}, {rc['warmup_steps']} warm-up steps then cosine; seed {rc['seed']}, {rc['threads']} torch "
             f"thread(s)). Loss: the class token names the image's dominant texture, plus {rc['cell_weight']} × a per-cell "
             "loss (each patch token names its own cell's texture).", "",
             f"Corpus: 3 × 3 mosaics of {len(r['corpus']['textures'])} texture classes (square-wave stripes at 6 "
             "orientations × 2 frequencies, checkerboards, dot lattices, rings, spokes, blurred noise, flat), 4–6 cells of "
             "the dominant class and distinct other classes elsewhere; no marker and no marked cell, no merge-task or "
             "Figure-2 class or texture generator.", "",
             f"Weights: `{Path(r['weights']).name}` (not committed; rebuilt by this script or by `--base FILE` when "
             f"missing), sha256 `{r['sha256']}`; tensor fingerprint `{r.get('fingerprint', '?')}` (the same for every "
             "rebuild: safetensors writes the header's metadata in hash order, so the file's bytes, hence its sha256, "
             "may differ between rebuilds while every tensor is equal).", "",
             f"Final training accuracy (last 10 steps): {r['history'][-1]['train_accuracy']:.3f} (chance {1 / len(r['corpus']['textures']):.3f}).", "",
             f"Linear probe on the frozen base (merge_table's probe; {rc['probe_train']} training images per task, "
             f"val {rc.get('probe_val', 150)}, test {rc.get('probe_test', 300)}):", "",
             "| task | chance | probe test acc | margin | ≥ chance + 0.20 |", "| --- | ---: | ---: | ---: | --- |"]
    for t, p in r["probes"].items():
        lines.append(f"| {t} | {p['chance']:.3f} | {p['test_accuracy']:.3f} | {p['margin_over_chance']:+.3f} | "
                     f"{'yes' if ok[t] else 'NO'} |")
    h, la = r["hardware"], r["load_average"]
    lines += ["", f"Ran {r['started']}: training {r['train_seconds'] / 60:.1f} min, all {r['seconds'] / 60:.1f} min on "
              f"{h.get('cpu', '?')} ({h.get('torch_threads', '?')} torch threads, no GPU); load average at start "
              f"{', '.join(f'{x:.1f}' for x in la['start'])}, at end {', '.join(f'{x:.1f}' for x in la['end'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Recipe()
    p.add_argument("--weights", type=Path, default=None, help="where to write the base (default: "
                   "./medlego-results/pretrain_base.safetensors, git-ignored)")
    for field in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "cell_weight", "threads",
                  "probe_train", "probe_val", "probe_test"):
        p.add_argument("--" + field.replace("_", "-"), type=type(getattr(d, field)), default=getattr(d, field))
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    a = p.parse_args(argv)
    recipe = Recipe(**{k: getattr(a, k) for k in asdict(Recipe()) if k != "model"})
    r = build(a.weights or default_weights_path(), recipe, log=lambda m: print(m, flush=True))
    out = Path(a.out or results_dir())
    write_json(r, out / "pretrain_base.json")
    (out / "pretrain_base.md").write_text(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
