"""The demo registry: a small base, three adapters trained on synthetic data, one Med-LEGO merge.

Everything is built locally in a folder (nothing is downloaded): a ``vit_tiny_patch16_224`` at
DEMO_SIZE px with seeded random weights (a stand-in for a real pretrained base), three synthetic
"medical" datasets (MedMNIST layout, textures per class), one SVD-LoRA adapter trained per task
with the project's fine-tuning entrypoint, and a Med-LEGO merge of the three registered as
``generalist`` (it carries all three heads). A second run reuses the folder.

The demo tells the truth about its adapters: for every adapter and task it reports the metrics of
the held-out test split exactly as ``medlego eval`` computes them (``scores``: the same function on
the same file), and the requests it sends (``requests``) are a fixed, seeded sample of test images,
never trained on, chosen without looking at any answer: each is then marked right or wrong beside
its true label (:func:`is_right`). Every image spans the full grey range, as a DICOM decodes
(min-max), so a DICOM file shows the adapter exactly what it was trained on.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DEMO_VERSION = 3  # what build_demo makes; a folder made by another version is rebuilt, never reused
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_SIZE = 64
DEMO_TASKS = (
    # name, labels, multilabel, rgb
    ("blood", ("neutrophil", "lymphocyte", "monocyte", "eosinophil"), False, True),
    ("derma", ("nevus", "melanoma", "keratosis"), False, True),
    ("chest", ("effusion", "nodule", "pneumonia", "cardiomegaly"), True, False),
)
MERGED_NAME = "generalist"
# (task, the adapter the request names, file format): a specialist, and the merge on two of its tasks
DEMO_REQUESTS = (("blood", "blood", "png"), ("derma", MERGED_NAME, "jpg"), ("chest", MERGED_NAME, "dcm"))
SAMPLE_SEED = 27  # which test images the demo sends: fixed, and never chosen by the answers
SAMPLE_PER_REQUEST = 3  # test images sent per (task, adapter, format)
_BUILT = ("base.safetensors", "datasets", "registry", "samples", "demo.json")  # what a rebuild removes


@dataclass
class DemoRequest:
    path: str  # the image file
    adapter: str
    task: str
    truth: str | list[str]  # the label, or the labels present (multi-label)
    test_index: int  # which test image it is


@dataclass
class DemoScore:
    """An adapter's metrics on one task's held-out test split, as `medlego eval` computes them."""

    adapter: str
    task: str
    data: str  # the dataset file
    multilabel: bool
    accuracy: float  # single-label: top-1; multi-label: label-wise (each label of each image at 0.5)
    auc: float
    n: int
    right: int  # single-label: images answered right; multi-label: images with every label right
    per_image: str = "top label right"


@dataclass
class DemoRegistry:
    root: Path
    model: str
    weights: Path
    data_dir: Path
    requests: list[DemoRequest] = field(default_factory=list)
    scores: list[DemoScore] = field(default_factory=list)


def is_right(answer: dict, truth) -> bool:
    """An answer judged against the true label: the top label (single-label), or (multi-label) exactly the
    labels present above 0.5 and none of the others."""
    if answer.get("multilabel"):
        return {label for label, p in answer["probabilities"].items() if p > 0.5} == set(truth)
    return answer["top"][0]["label"] == truth


def sample_indices(n_test: int, task_index: int, k: int = SAMPLE_PER_REQUEST, seed: int = SAMPLE_SEED) -> list[int]:
    """The test images a request sends: a seeded draw that depends only on the split's size and the seed,
    never on any adapter's answers."""
    rng = np.random.default_rng([seed, task_index])
    return sorted(int(i) for i in rng.choice(n_test, size=min(k, n_test), replace=False))


def build_demo(root: str | Path, *, epochs: int = 6, log=print, size: int = DEMO_SIZE,
               n_train: int = 200, n_test: int = 60, sample: int = SAMPLE_PER_REQUEST) -> DemoRegistry:
    """Build (or reuse) the demo folder: base weights, registry with trained + merged adapters, samples.
    ``size``, ``n_train``, ``n_test`` and ``sample`` make a smaller demo (tests)."""
    from medlego.runtime.base import init_weights_file, load_base
    from medlego.runtime.registry import Registry

    root = Path(root).expanduser().resolve()
    reused = _reuse(root, log)
    if reused is not None:
        return reused
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    weights = root / "base.safetensors"
    if not weights.is_file():
        init_weights_file(DEMO_MODEL, 0, weights, img_size=size)
    base = load_base(DEMO_MODEL, weights)
    log(f"base: {DEMO_MODEL} at {base.input_size} px, random weights (seed 0) -> {weights}")
    data_dir = root / "registry"
    reg = Registry(data_dir, base=base.spec, max_rank=16, input_size=base.input_size)
    existing = {e.name for e in reg.list()}
    for seed, (task, labels, multilabel, rgb) in enumerate(DEMO_TASKS):
        npz = _dataset(root, task, len(labels), multilabel, rgb, seed, size, n_train, n_test)
        if task not in existing:  # an interrupted build goes on where it stopped
            reg.register(task, _train(base, npz, task, labels, epochs, seed, log))
    if MERGED_NAME not in existing:
        _merge(reg, log)
    requests = [r for i, spec in enumerate(DEMO_REQUESTS) for r in _requests(root, reg, i, *spec, k=sample)]
    scores = _scores(root, base, reg)
    demo = DemoRegistry(root, DEMO_MODEL, weights, data_dir, requests, scores)
    (root / "demo.json").write_text(json.dumps({"version": DEMO_VERSION, "model": DEMO_MODEL, "weights": str(weights),
                                                "data_dir": str(data_dir),
                                                "requests": [asdict(r) for r in demo.requests],
                                                "scores": [asdict(s) for s in demo.scores]}, indent=1))
    log(f"demo registry ready in {time.perf_counter() - t0:.0f} s: {data_dir}")
    return demo


def _reuse(root: Path, log) -> DemoRegistry | None:
    """The finished demo in root, if this version made it; a folder of another version is emptied."""
    manifest = root / "demo.json"
    if not manifest.is_file():
        return None
    info = json.loads(manifest.read_text())
    if info.get("version") == DEMO_VERSION and Path(info["weights"]).is_file():
        from medlego.runtime.registry import Registry

        names = {e.name for e in Registry(info["data_dir"]).list()}
        if {t[0] for t in DEMO_TASKS} | {MERGED_NAME} <= names:
            log(f"reusing the demo registry in {root}")
            return DemoRegistry(root, info["model"], Path(info["weights"]), Path(info["data_dir"]),
                                [DemoRequest(**r) for r in info["requests"]], [DemoScore(**s) for s in info["scores"]])
    log(f"{root} holds a demo made by another medlego version: rebuilding it")
    for name in _BUILT:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


def _dataset(root: Path, task: str, classes: int, multilabel: bool, rgb: bool, seed: int, size: int,
             n_train: int, n_test: int) -> Path:
    npz = root / "datasets" / f"{task}.npz"
    if not npz.is_file():
        from .synthetic import make_synthetic_medmnist

        make_synthetic_medmnist(npz, classes=classes, multilabel=multilabel, size=size, rgb=rgb,
                                n_train=n_train, n_val=max(4, n_train * 3 // 10), n_test=n_test, seed=100 + seed,
                                full_range=True)
    return npz


def _train(base, npz: Path, task: str, labels, epochs: int, seed: int, log) -> bytes:
    from .datasets import load_dataset
    from .train import TrainConfig, train_adapter

    t0 = time.perf_counter()
    ds = load_dataset(npz, input_size=base.input_size, label_names=list(labels))
    log(f"training '{task}' ({len(labels)} {'labels' if ds.multilabel else 'classes'}, synthetic data, "
        f"{epochs} epochs, r=4)")
    # progress: one line per epoch (and tqdm's bar over the steps on a terminal only: no carriage returns in a pipe)
    cfg = TrainConfig(task=task, epochs=epochs, lr=3e-3, rank=4, batch_size=32, seed=seed, progress=True)
    result = train_adapter(base, ds, cfg, log=lambda m: log(f"  {task}: {m}"))
    log(f"trained '{task}' in {time.perf_counter() - t0:.0f} s")
    return result.adapter.to_bytes()


def _merge(reg, log) -> None:
    from medlego.runtime.adapter_merge import merge_adapters

    loaded = [reg.load(t[0]) for t in DEMO_TASKS]
    merged, report = merge_adapters([a for _, a in loaded], "med-lego", {"threshold": 0.997, "max_rank": 16},
                                    source_info=[{"ref": e.ref, "name": e.name, "version": e.version,
                                                  "sha256": e.sha256} for e, _ in loaded])
    entry = reg.register(MERGED_NAME, merged.to_bytes())
    ranks = [m["rank"] for m in report["matrices"].values()]
    log(f"merged {' + '.join(t[0] for t in DEMO_TASKS)} with Med-LEGO (no data, no training) -> registered "
        f"{entry.ref} (tasks: {', '.join(merged.task_names)}; rank per matrix {min(ranks)}..{max(ranks)})")


def _scores(root: Path, base, reg) -> list[DemoScore]:
    """Every adapter on each of its tasks' test split, with `medlego eval`'s own function."""
    from medlego.runtime.model import AdaptedViT

    from .datasets import load_dataset
    from .evaluate import evaluate_on, predict_probs

    model = AdaptedViT(base)
    out = []
    for name in [t[0] for t in DEMO_TASKS] + [MERGED_NAME]:
        _, adapter = reg.load(name)
        for spec in adapter.tasks:
            npz = root / "datasets" / f"{spec.name}.npz"
            m = evaluate_on(base, adapter, npz, spec.name, "test", model=model)
            data = load_dataset(npz, input_size=base.input_size, num_classes=spec.num_classes,
                                label_names=list(spec.labels) if not spec.multilabel else None).split("test")
            probs = predict_probs(base, adapter, data.images, spec.name, model=model)
            if spec.multilabel:
                right = int(((probs > 0.5) == data.labels.bool()).all(dim=1).sum())
            else:
                right = int((probs.argmax(1) == data.labels.reshape(-1)).sum())
            out.append(DemoScore(name, spec.name, str(npz), spec.multilabel, float(m["accuracy"]), float(m["auc"]),
                                 int(m["n"]), right, "every label right" if spec.multilabel else "top label right"))
    return out


def _requests(root: Path, reg, task_index: int, task: str, adapter_ref: str, fmt: str, k: int) -> list[DemoRequest]:
    """The requests for `task` to `adapter_ref` as .fmt files: the seeded sample of its test images
    (:func:`sample_indices`), whatever the adapter answers. The first is also written as
    ``samples/TASK.{png,jpg[,dcm]}`` (what the README's examples send), the others as ``samples/TASK-N.*``."""
    from .synthetic import write_image_files

    _, adapter = reg.load(adapter_ref)
    spec = adapter.task(task)
    with np.load(root / "datasets" / f"{task}.npz") as data:
        images, labels = data["test_images"], data["test_labels"]
    out = []
    for j, index in enumerate(sample_indices(len(images), task_index, k)):
        label = labels[index]
        truth = [spec.labels[i] for i in np.flatnonzero(label)] if spec.multilabel else spec.labels[int(label.reshape(-1)[0])]
        stem = root / "samples" / (task if j == 0 else f"{task}-{j + 1}")
        write_image_files(images[index], stem)
        out.append(DemoRequest(f"{stem}.{fmt}", adapter_ref, task, truth, index))
    return out
