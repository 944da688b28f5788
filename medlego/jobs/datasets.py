"""Medical datasets from local files, resized once to the base's input size.

Sources (nothing is downloaded):

* a MedMNIST ``.npz`` (``{train,val,test}_images`` [N, H, W] or [N, H, W, 3] uint8, ``*_labels``
  [N, 1] class ids or [N, C] 0/1 for multi-label sets such as ChestMNIST), any published size;
* an image folder: ``train/ val/ test/`` each with one sub-folder per class, or one folder of
  class sub-folders that is split 70/10/20 reproducibly by seed;
* a CSV manifest with columns ``path,label`` (``a|b`` for several labels → multi-label) and an
  optional ``split`` column (else split by seed); paths are relative to the CSV; PNG, JPEG and
  DICOM (pydicom: rescale slope/intercept, window, MONOCHROME1 inverted) by content.

Images are stored resized (bilinear, no crop — runtime/imaging/'s definition) in [0, 1];
normalisation by mean/std is applied per batch so the same tensors serve any adapter's stats.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medlego.runtime.adapter import Preprocess
from medlego.runtime.errors import BadImageError, BadInputError
from medlego.runtime.imaging import load_image_file, to_chw

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


@dataclass
class Split:
    images: torch.Tensor  # [N, 3, S, S] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64, or [N, C] float32 (multi-label)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    name: str
    labels: tuple[str, ...]
    multilabel: bool
    splits: dict[str, Split]
    fingerprint: str  # sha256 of the source arrays or file listing
    source: str
    input_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> Split:
        if name not in self.splits or len(self.splits[name]) == 0:
            raise BadInputError(f"dataset {self.source} has no '{name}' split (has: {', '.join(k for k, v in self.splits.items() if len(v))})")
        return self.splits[name]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def normalise(images: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    mean = torch.tensor(pp.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _resize_batch(chw: list[torch.Tensor], size: int) -> torch.Tensor:
    out = []
    for t in chw:
        if tuple(t.shape[1:]) != (size, size):
            shrink = t.shape[1] > size or t.shape[2] > size
            t = F.interpolate(t.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                              antialias=shrink).squeeze(0)
        out.append(t.clamp(0, 1))
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def _resize_array_stack(arr: np.ndarray, size: int) -> torch.Tensor:
    """[N, H, W] or [N, H, W, 3] uint8 → [N, 3, S, S] float in [0, 1], resized in chunks."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0
    t = t.unsqueeze(1).expand(-1, 3, -1, -1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    if tuple(t.shape[2:]) == (size, size):
        return t.contiguous()
    shrink = t.shape[2] > size or t.shape[3] > size
    return torch.cat([F.interpolate(t[i:i + 512], size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=shrink) for i in range(0, len(t), 512)]).clamp(0, 1)


def _check_labels(labels: torch.Tensor, num_classes: int, multilabel: bool, where: str) -> None:
    if multilabel:
        if labels.dim() != 2 or labels.shape[1] != num_classes or not bool(((labels == 0) | (labels == 1)).all()):
            raise BadInputError(f"{where}: multi-label labels must be 0/1 with {num_classes} columns")
    elif len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise BadInputError(f"{where}: label {bad} is out of range for {num_classes} classes")


def load_npz(path: Path, input_size: int, label_names: list[str] | None = None,
             num_classes: int | None = None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as e:
        raise BadInputError(f"cannot read {path} as an .npz file: {e}") from None
    h = hashlib.sha256()
    for split in SPLITS:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in data:
                raise BadInputError(f"{path} has no '{key}' array: missing the '{split}' split")
            h.update(key.encode())
            h.update(np.ascontiguousarray(data[key]).tobytes())
    first = data["train_labels"]
    multilabel = first.ndim == 2 and first.shape[1] > 1
    if multilabel:
        n_cls = first.shape[1]
    else:
        n_cls = num_classes or (len(label_names) if label_names else
                                int(max(int(data[f"{s}_labels"].max()) for s in SPLITS if data[f"{s}_labels"].size)) + 1)
    names = tuple(label_names) if label_names else tuple(f"class{i}" for i in range(n_cls))
    if len(names) != n_cls:
        raise BadInputError(f"{len(names)} label names given but the data has {n_cls} classes")
    splits = {}
    for split in SPLITS:
        imgs = data[f"{split}_images"]
        if imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[-1] not in (1, 3)):
            raise BadInputError(f"{path}: {split}_images has shape {imgs.shape}, expected [N, H, W] or [N, H, W, 3]")
        if imgs.ndim == 4 and imgs.shape[-1] == 1:
            imgs = imgs[..., 0]
        raw = data[f"{split}_labels"]
        labels = torch.from_numpy(raw.astype(np.float32)) if multilabel else torch.from_numpy(raw.reshape(-1).astype(np.int64))
        _check_labels(labels, n_cls, multilabel, f"{path} {split}")
        if len(labels) != len(imgs):
            raise BadInputError(f"{path}: {split} has {len(imgs)} images but {len(labels)} labels")
        splits[split] = Split(_resize_array_stack(imgs, input_size), labels)
    return Dataset(path.stem, names, multilabel, splits, h.hexdigest(), str(path), input_size)


def _split_indices(n: int, seed: int) -> dict[str, list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_val = int(round(0.7 * n)), int(round(0.1 * n))
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


def _read(path: Path) -> torch.Tensor:
    try:
        return to_chw(load_image_file(path))
    except BadImageError as e:
        raise BadInputError(f"unreadable image {path}: {e}") from None
    except OSError as e:
        raise BadInputError(f"unreadable image {path}: {e.strerror or e}") from None


def load_folder(root: Path, input_size: int, seed: int) -> Dataset:
    has_splits = all((root / s).is_dir() for s in ("train", "val", "test"))
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and not has_splits:  # some split folders but not all: a missing split, not class folders
        missing = [s for s in SPLITS if s not in present]
        raise BadInputError(f"{root} has a {'/, '.join(present)}/ folder but no {'/, '.join(missing)}/ folder")
    class_root = root / "train" if has_splits else root
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise BadInputError(f"{class_root} needs one sub-folder per class (found {len(classes)})")

    def listing(d: Path) -> list[tuple[Path, int]]:
        items = []
        for c, name in enumerate(classes):
            folder = d / name
            if folder.is_dir():
                items += [(p, c) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        return items

    if has_splits:
        parts = {s: listing(root / s) for s in SPLITS}
    else:
        items = listing(root)
        idx = _split_indices(len(items), seed)
        parts = {s: [items[i] for i in idx[s]] for s in SPLITS}
    h = hashlib.sha256()
    splits = {}
    for s in SPLITS:
        for p, c in parts[s]:
            h.update(f"{s}/{p.relative_to(root)}:{c}:{p.stat().st_size}".encode())
        splits[s] = Split(_resize_batch([_read(p) for p, _ in parts[s]], input_size),
                          torch.tensor([c for _, c in parts[s]], dtype=torch.int64))
    return Dataset(root.name, tuple(classes), False, splits, h.hexdigest(), str(root), input_size)


def load_manifest(path: Path, input_size: int, seed: int, multilabel: bool | None = None) -> Dataset:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise BadInputError(f"{path} must be a CSV with a header holding at least 'path' and 'label'")
    label_sets = [[x.strip() for x in r["label"].split("|") if x.strip()] for r in rows]
    ml = multilabel if multilabel is not None else any(len(s) != 1 for s in label_sets) or any("|" in r["label"] for r in rows)
    names = tuple(sorted({x for s in label_sets for x in s}))
    if not ml and len(names) < 2:
        raise BadInputError(f"{path}: a single-label task needs at least 2 labels")
    index = {n: i for i, n in enumerate(names)}
    if "split" in rows[0]:
        bad = sorted({r["split"] for r in rows} - set(SPLITS))
        if bad:
            raise BadInputError(f"{path}: unknown split name(s) {', '.join(bad)} (use train, val, test)")
        parts = {s: [i for i, r in enumerate(rows) if r["split"] == s] for s in SPLITS}
    else:
        parts = _split_indices(len(rows), seed)
    h = hashlib.sha256()
    splits = {}
    for s in SPLITS:
        imgs, labels = [], []
        for i in parts[s]:
            p = (path.parent / rows[i]["path"]).resolve()
            if not p.is_file():
                raise BadInputError(f"{path} row {i + 2}: image not found: {rows[i]['path']}")
            h.update(f"{s}/{rows[i]['path']}:{rows[i]['label']}:{p.stat().st_size}".encode())
            imgs.append(_read(p))
            if ml:
                y = torch.zeros(len(names))
                y[[index[x] for x in label_sets[i]]] = 1.0
                labels.append(y)
            else:
                labels.append(index[label_sets[i][0]])
        lab = torch.stack(labels) if ml and labels else (torch.zeros(0, len(names)) if ml else torch.tensor(labels, dtype=torch.int64))
        splits[s] = Split(_resize_batch(imgs, input_size), lab)
    return Dataset(path.stem, names, ml, splits, h.hexdigest(), str(path), input_size)


def load_dataset(path: str | Path, *, input_size: int, seed: int = 0, label_names: list[str] | None = None,
                 num_classes: int | None = None, multilabel: bool | None = None) -> Dataset:
    """Dispatch on what ``path`` is: .npz, .csv manifest, or an image folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInputError(f"dataset not found: {p}")
    if p.is_dir():
        return load_folder(p, input_size, seed)
    if p.suffix == ".npz":
        return load_npz(p, input_size, label_names, num_classes)
    if p.suffix == ".csv":
        return load_manifest(p, input_size, seed, multilabel)
    raise BadInputError(f"unsupported dataset {p}: give a MedMNIST .npz, a .csv manifest or an image folder")
