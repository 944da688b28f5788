"""The demo registry: a small base, three adapters trained on synthetic data, one Med-LEGO merge.

Everything is built locally in a folder (nothing is downloaded): a ``vit_tiny_patch16_224`` at
64 px with seeded random weights (a stand-in for a real pretrained base), three synthetic
"medical" datasets (MedMNIST layout, textures per class), one SVD-LoRA adapter trained per task
with the project's fine-tuning entrypoint, and a Med-LEGO merge of the three registered as
``generalist`` (it carries all three heads). Sample images (PNG, and a DICOM) are written beside
them for curl. A second run reuses the folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_SIZE = 64
DEMO_TASKS = (
    # name, labels, multilabel, rgb
    ("blood", ("neutrophil", "lymphocyte", "monocyte", "eosinophil"), False, True),
    ("derma", ("nevus", "melanoma", "keratosis"), False, True),
    ("chest", ("effusion", "nodule", "pneumonia", "cardiomegaly"), True, False),
)
MERGED_NAME = "generalist"


@dataclass
class DemoRegistry:
    root: Path
    model: str
    weights: Path
    data_dir: Path
    samples: dict = field(default_factory=dict)  # name -> {"path", "adapter", "task", "truth"}
    notes: list = field(default_factory=list)


def _sample_files(root: Path, task: str, npz: Path, labels, multilabel: bool) -> dict:
    """A test image of the task as PNG (and, for the grey chest task, also as DICOM) + its true label(s)."""
    from .synthetic import encode_dicom, encode_png

    data = np.load(npz, allow_pickle=False)
    img, lab = data["test_images"][0], data["test_labels"][0]
    truth = [labels[i] for i in np.flatnonzero(lab)] if multilabel else labels[int(np.asarray(lab).reshape(-1)[0])]
    out = {}
    png = root / "samples" / f"{task}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(encode_png(img))
    out[f"{task}.png"] = {"path": str(png), "task": task, "truth": truth}
    if img.ndim == 2:
        dcm = root / "samples" / f"{task}.dcm"
        dcm.write_bytes(encode_dicom(img.astype(np.float32) / 255.0))
        out[f"{task}.dcm"] = {"path": str(dcm), "task": task, "truth": truth}
    return out


def build_demo(root: str | Path, *, epochs: int = 6, log=print) -> DemoRegistry:
    """Build (or reuse) the demo folder: base weights, registry with trained + merged adapters, samples."""
    from medlego.runtime.base import init_weights_file, load_base
    from medlego.runtime.registry import Registry

    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "demo.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        reg = Registry(info["data_dir"])
        if {t[0] for t in DEMO_TASKS} | {MERGED_NAME} <= {e.name for e in reg.list()} and Path(info["weights"]).is_file():
            log(f"reusing the demo registry in {root}")
            return DemoRegistry(root, info["model"], Path(info["weights"]), Path(info["data_dir"]), info["samples"],
                                info.get("notes", []))
    t0 = time.perf_counter()
    weights = root / "base.safetensors"
    if not weights.is_file():
        init_weights_file(DEMO_MODEL, 0, weights, img_size=DEMO_SIZE)
    base = load_base(DEMO_MODEL, weights)
    log(f"base: {DEMO_MODEL} at {DEMO_SIZE} px, random weights (seed 0) -> {weights}")
    data_dir = root / "registry"
    reg = Registry(data_dir, base=base.spec, max_rank=16, input_size=base.input_size)
    demo = DemoRegistry(root, DEMO_MODEL, weights, data_dir)
    existing = {e.name for e in reg.list()}
    trained = []
    for seed, (task, labels, multilabel, rgb) in enumerate(DEMO_TASKS):
        npz = root / "datasets" / f"{task}.npz"
        if not npz.is_file():
            from medlego.jobs.synthetic import make_synthetic_medmnist

            make_synthetic_medmnist(npz, classes=len(labels), multilabel=multilabel, size=DEMO_SIZE, rgb=rgb,
                                    n_train=200, n_val=60, n_test=60, seed=100 + seed)
        demo.samples.update(_sample_files(root, task, npz, labels, multilabel))
        trained.append(task)
        if task in existing:
            continue
        data, note = _train_or_random(base, npz, task, labels, epochs, seed, log)
        if note:
            demo.notes.append(note)
        reg.register(task, data)
    if MERGED_NAME not in existing:
        from medlego.runtime.adapter_merge import merge_adapters

        loaded = [reg.load(t) for t in trained]
        merged, report = merge_adapters([a for _, a in loaded], "med-lego", {"threshold": 0.997, "max_rank": 16},
                                        source_info=[{"ref": e.ref, "name": e.name, "version": e.version,
                                                      "sha256": e.sha256} for e, _ in loaded])
        entry = reg.register(MERGED_NAME, merged.to_bytes())
        ranks = [m["rank"] for m in report["matrices"].values()]
        log(f"merged {' + '.join(trained)} with Med-LEGO (no data, no training) -> registered {entry.ref} "
            f"(tasks: {', '.join(merged.task_names)}; rank per matrix {min(ranks)}..{max(ranks)})")
    for s in demo.samples.values():
        s["adapter"] = s["task"]
    manifest.write_text(json.dumps({"model": DEMO_MODEL, "weights": str(weights), "data_dir": str(data_dir),
                                    "samples": demo.samples, "notes": demo.notes}, indent=1))
    log(f"demo registry ready in {time.perf_counter() - t0:.0f} s: {data_dir}")
    return demo


def _train_or_random(base, npz: Path, task: str, labels, epochs: int, seed: int, log) -> tuple[bytes, str | None]:
    """A trained adapter (medlego.jobs.train); random factors only if the training code is absent."""
    try:
        from medlego.jobs.datasets import load_dataset
        from medlego.jobs.train import TrainConfig, train_adapter
    except ImportError as e:  # a checkout without the fine-tuning entrypoint
        from medlego.runtime.adapter import TaskSpec
        from medlego.jobs.synthetic import random_adapter

        note = f"{task}: random adapter (training code unavailable: {e})"
        log(f"note: {note}")
        ad = random_adapter(base.spec, base.preprocess, rank=4, seed=seed,
                            tasks=[TaskSpec(task, tuple(labels), task == "chest")])
        return ad.to_bytes(), note
    t0 = time.perf_counter()
    ds = load_dataset(npz, input_size=base.input_size, label_names=list(labels))
    cfg = TrainConfig(task=task, epochs=epochs, lr=3e-3, rank=4, batch_size=32, seed=seed, progress=False)
    result = train_adapter(base, ds, cfg, log=lambda *a: None)
    metric = f"test AUC {result.test['auc']:.3f}" if ds.multilabel else f"test accuracy {result.test['accuracy']:.3f}"
    log(f"trained '{task}' ({len(labels)} {'labels' if ds.multilabel else 'classes'}, synthetic data, "
        f"{epochs} epochs, r=4): {metric} ({time.perf_counter() - t0:.0f} s)")
    return result.adapter.to_bytes(), None
