"""A small, learnable, medical-looking synthetic dataset in the MedMNIST ``.npz`` layout.

Each image is noisy "tissue" with a bright spot at a random place (a distractor) and, per label,
a texture of its own orientation and frequency. Single-label: the class is which texture is
present; multi-label: each label is the presence of its texture. Textures are global, so even a
randomly initialised ViT (the tests' base) carries the signal and an adapter learns it in a few
CPU epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pattern(size: int, k: int) -> np.ndarray:
    """Label k's texture: a grating with its own orientation and frequency (like a tissue pattern)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * k / 5.0
    freq = 3 + 2 * (k % 3)
    return np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))


def _image(rng, size: int, present, rgb: bool, offset: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.35 + 0.05 * rng.standard_normal((size, size))
    for k in present:
        img += 0.18 * _pattern(size, k + offset) * rng.uniform(0.8, 1.2)
    cy, cx = rng.uniform(0.2, 0.8, 2)  # an unrelated bright spot: position carries no label
    img += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.07 ** 2))
    img = np.clip(img, 0, 1)
    if rgb:  # a stain-like tint
        img = np.stack([img, img * 0.8 + 0.1, img * 0.9], -1)
    return (img * 255).astype(np.uint8)


def make_synthetic_medmnist(path: str | Path, *, classes: int = 4, multilabel: bool = False, size: int = 28,
                            rgb: bool = False, n_train: int = 200, n_val: int = 60, n_test: int = 60,
                            seed: int = 0, pattern_offset: int = 0) -> Path:
    """Write ``train_images``/``train_labels``/``val_*``/``test_*`` like medmnist does ([N, 1] int labels,
    or [N, C] 0/1 for multi-label). ``pattern_offset`` shifts which textures the labels use, so that
    several datasets are different tasks (the merge table uses it)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        imgs, labels = [], []
        for _ in range(n):
            if multilabel:
                y = (rng.random(classes) < 0.4).astype(np.uint8)
                present = list(np.flatnonzero(y))
                labels.append(y)
            else:
                c = int(rng.integers(classes))
                present = [c]
                labels.append([c])
            imgs.append(_image(rng, size, present, rgb, pattern_offset))
        arrays[f"{split}_images"] = np.stack(imgs)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8 if multilabel else np.int64)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out
