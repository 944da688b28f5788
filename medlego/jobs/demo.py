"""The demo registry: a small base, three adapters trained on synthetic data, one Med-LEGO merge.

Everything is built locally in a folder (nothing is downloaded): a ``vit_tiny_patch16_224`` at
DEMO_SIZE px with seeded random weights (a stand-in for a real pretrained base), three synthetic
"medical" datasets (MedMNIST layout, textures per class), one SVD-LoRA adapter trained per task
with the project's fine-tuning entrypoint, and a Med-LEGO merge of the three registered as
``generalist`` (it carries all three heads). A second run reuses the folder.

The requests the demo sends (DEMO_REQUESTS) are test images, never trained on, written as the
file format the request uses. Every image spans the full grey range, as a DICOM decodes (min-max),
so a DICOM file shows the adapter exactly what it was trained on. Each request sends the first
test image that its adapter answers right through the server's own decoding, and the log says how
many of the test images it answers right: the demo shows real answers, and says how typical they are.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DEMO_VERSION = 2  # what build_demo makes; a folder made by another version is rebuilt, never reused
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
_BUILT = ("base.safetensors", "datasets", "registry", "samples", "demo.json")  # what a rebuild removes


@dataclass
class DemoRequest:
    path: str  # the image file
    adapter: str
    task: str
    truth: str | list[str]  # the label, or the labels present (multi-label)
    test_index: int  # which test image it is
    right: int  # of the test split's images, how many this adapter answers right in this format
    of: int


@dataclass
class DemoRegistry:
    root: Path
    model: str
    weights: Path
    data_dir: Path
    requests: list[DemoRequest] = field(default_factory=list)


def build_demo(root: str | Path, *, epochs: int = 6, log=print) -> DemoRegistry:
    """Build (or reuse) the demo folder: base weights, registry with trained + merged adapters, samples."""
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
        init_weights_file(DEMO_MODEL, 0, weights, img_size=DEMO_SIZE)
    base = load_base(DEMO_MODEL, weights)
    log(f"base: {DEMO_MODEL} at {DEMO_SIZE} px, random weights (seed 0) -> {weights}")
    data_dir = root / "registry"
    reg = Registry(data_dir, base=base.spec, max_rank=16, input_size=base.input_size)
    existing = {e.name for e in reg.list()}
    for seed, (task, labels, multilabel, rgb) in enumerate(DEMO_TASKS):
        npz = _dataset(root, task, len(labels), multilabel, rgb, seed)
        if task not in existing:  # an interrupted build goes on where it stopped
            reg.register(task, _train(base, npz, task, labels, epochs, seed, log))
    if MERGED_NAME not in existing:
        _merge(reg, log)
    demo = DemoRegistry(root, DEMO_MODEL, weights, data_dir,
                        [_request(root, base, reg, *r) for r in DEMO_REQUESTS])
    for r in demo.requests:
        log(f"{r.adapter} answers {r.right} of the {r.of} '{r.task}' test images right as .{r.path.rsplit('.', 1)[1]} "
            f"files; the demo sends test image #{r.test_index}")
    (root / "demo.json").write_text(json.dumps({"version": DEMO_VERSION, "model": DEMO_MODEL, "weights": str(weights),
                                                "data_dir": str(data_dir),
                                                "requests": [asdict(r) for r in demo.requests]}, indent=1))
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
                                [DemoRequest(**r) for r in info["requests"]])
    log(f"{root} holds a demo made by another medlego version: rebuilding it")
    for name in _BUILT:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


def _dataset(root: Path, task: str, classes: int, multilabel: bool, rgb: bool, seed: int) -> Path:
    npz = root / "datasets" / f"{task}.npz"
    if not npz.is_file():
        from .synthetic import make_synthetic_medmnist

        make_synthetic_medmnist(npz, classes=classes, multilabel=multilabel, size=DEMO_SIZE, rgb=rgb,
                                n_train=200, n_val=60, n_test=60, seed=100 + seed, full_range=True)
    return npz


def _train(base, npz: Path, task: str, labels, epochs: int, seed: int, log) -> bytes:
    from .datasets import load_dataset
    from .train import TrainConfig, train_adapter

    t0 = time.perf_counter()
    ds = load_dataset(npz, input_size=base.input_size, label_names=list(labels))
    cfg = TrainConfig(task=task, epochs=epochs, lr=3e-3, rank=4, batch_size=32, seed=seed, progress=False)
    result = train_adapter(base, ds, cfg, log=lambda *a: None)
    metric = f"test AUC {result.test['auc']:.3f}" if ds.multilabel else f"test accuracy {result.test['accuracy']:.3f}"
    log(f"trained '{task}' ({len(labels)} {'labels' if ds.multilabel else 'classes'}, synthetic data, "
        f"{epochs} epochs, r=4): {metric} ({time.perf_counter() - t0:.0f} s)")
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


def _request(root: Path, base, reg, task: str, adapter_ref: str, fmt: str) -> DemoRequest:
    """The request for `task` to `adapter_ref` as a .fmt file: the first test image the adapter
    answers right when decoded from that format, as the server decodes it (multi-label: the first
    with at least one finding, where one is answered right, so the answer shows a finding)."""
    import torch

    from medlego.runtime.imaging import decode_image, preprocess
    from medlego.runtime.model import AdaptedViT, adapter_logits, probabilities

    from .synthetic import encode_dicom, encode_jpeg, encode_png, write_image_files

    encode = {"png": encode_png, "jpg": encode_jpeg, "dcm": lambda a: encode_dicom(a.astype(np.float32) / 255.0)}[fmt]
    _, adapter = reg.load(adapter_ref)
    spec = adapter.task(task)
    with np.load(root / "datasets" / f"{task}.npz") as data:
        images, labels = data["test_images"], data["test_labels"]
    x = torch.stack([preprocess(decode_image(encode(img)), adapter.preprocess) for img in images])
    with torch.no_grad():
        probs = probabilities(adapter_logits(AdaptedViT(base), adapter, x, task), spec)
    if spec.multilabel:
        right = ((probs > 0.5).numpy() == labels.astype(bool)).all(axis=1)
    else:
        right = probs.argmax(1).numpy() == labels.reshape(-1)
    shown = right & labels.astype(bool).any(axis=1) if spec.multilabel else right
    if not shown.any():  # multi-label: no image with a finding answered right; any image answered right
        shown = right
    index = int(np.flatnonzero(shown)[0]) if shown.any() else 0  # none right (a one-epoch build): the first
    label = labels[index]
    truth = [spec.labels[i] for i in np.flatnonzero(label)] if spec.multilabel else spec.labels[int(label.reshape(-1)[0])]
    write_image_files(images[index], root / "samples" / task)
    return DemoRequest(str(root / "samples" / f"{task}.{fmt}"), adapter_ref, task, truth, index, int(right.sum()),
                       len(right))
