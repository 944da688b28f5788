"""Synthetic inputs for demos, tests and benchmarks: seeded adapters, a MedMNIST-style dataset, encoded images.

Nothing here is used on a request path; it exists so that every part of medlego can be run and
measured without downloading a model or a dataset.

* :func:`random_adapter`: an adapter with random (orthonormal) factors, any ranks and tasks.
* :func:`make_synthetic_medmnist`: a small, learnable, medical-looking dataset in the MedMNIST
  ``.npz`` layout. Each image is noisy "tissue" with a bright spot at a random place (a
  distractor) and, per label, a texture of its own orientation and frequency. Single-label: the
  class is which texture is present; multi-label: each label is the presence of its texture.
  Textures are global, so even a randomly initialised ViT (the tests' base) carries the signal
  and an adapter learns it in a few CPU epochs.
* :func:`encode_png` / :func:`encode_jpeg` / :func:`encode_dicom`, :func:`write_image_files` and
  :func:`random_image`: the files the demo, ``medlego samples``, the load benchmark and the tests
  send to the servers.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from medlego.runtime.adapter import Adapter, BaseSpec, Head, LowRank, Preprocess, TaskSpec, utc_now


# -- adapters --------------------------------------------------------------------------------------
def random_lowrank(d: int, rank: int, generator: torch.Generator, scale: float = 0.05) -> LowRank:
    """Orthonormal A and B (as a trained SVD-LoRA tends to be), positive singular values."""
    a = torch.linalg.qr(torch.randn(d, rank, generator=generator))[0].T.contiguous()
    b = torch.linalg.qr(torch.randn(d, rank, generator=generator))[0].contiguous()
    e = (torch.rand(rank, generator=generator) + 0.5) * scale * d ** 0.5
    return LowRank(a, e.sort(descending=True).values, b)


def random_adapter(base: BaseSpec, preprocess: Preprocess, *, rank: int | list[int] = 4,
                   tasks: list[TaskSpec] | None = None, seed: int = 0, scale: float = 0.05,
                   provenance: dict | None = None) -> Adapter:
    """An adapter with random factors. ``rank`` may be a list of 2·depth ranks (q0, v0, q1, v1, …)."""
    g = torch.Generator().manual_seed(seed)
    d, depth = base.embed_dim, base.depth
    ranks = [rank] * (2 * depth) if isinstance(rank, int) else list(rank)
    if len(ranks) != 2 * depth:
        raise ValueError(f"need {2 * depth} ranks, got {len(ranks)}")
    q = tuple(random_lowrank(d, ranks[2 * i], g, scale) for i in range(depth))
    v = tuple(random_lowrank(d, ranks[2 * i + 1], g, scale) for i in range(depth))
    tasks = tasks or [TaskSpec(f"task{seed}", tuple(f"class{c}" for c in range(3)), False)]
    heads = {t.name: Head(torch.randn(t.num_classes, d, generator=g) * 0.2,
                          torch.randn(t.num_classes, generator=g) * 0.1) for t in tasks}
    return Adapter(base=base, tasks=tuple(tasks), preprocess=preprocess, q=q, v=v, heads=heads,
                   provenance=provenance or {"kind": "random", "seed": seed}, created=utc_now())


# -- a dataset -------------------------------------------------------------------------------------
def _pattern(size: int, k: int) -> np.ndarray:
    """Label k's texture: a grating with its own orientation and frequency (like a tissue pattern)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * k / 5.0
    freq = 3 + 2 * (k % 3)
    return np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))


def _image(rng, size: int, present, rgb: bool, offset: int = 0, full_range: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.35 + 0.05 * rng.standard_normal((size, size))
    for k in present:
        img += 0.18 * _pattern(size, k + offset) * rng.uniform(0.8, 1.2)
    cy, cx = rng.uniform(0.2, 0.8, 2)  # an unrelated bright spot: position carries no label
    img += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.07 ** 2))
    img = np.clip(img, 0, 1)
    if full_range:  # darkest pixel 0, brightest 1: what a DICOM decodes to (min-max), so both formats agree
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    if rgb:  # a stain-like tint
        img = np.stack([img, img * 0.8 + 0.1, img * 0.9], -1)
    return (img * 255).astype(np.uint8)


def make_synthetic_medmnist(path: str | Path, *, classes: int = 4, multilabel: bool = False, size: int = 28,
                            rgb: bool = False, n_train: int = 200, n_val: int = 60, n_test: int = 60,
                            seed: int = 0, pattern_offset: int = 0, full_range: bool = False) -> Path:
    """Write ``train_images``/``train_labels``/``val_*``/``test_*`` like medmnist does ([N, 1] int labels,
    or [N, C] 0/1 for multi-label). ``pattern_offset`` shifts which textures the labels use, so that
    several datasets are different tasks (the merge table uses it). ``full_range`` stretches each
    image to 0..255, as a DICOM decodes (min-max), so that its PNG and DICOM files are the same image."""
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
            imgs.append(_image(rng, size, present, rgb, pattern_offset, full_range))
        arrays[f"{split}_images"] = np.stack(imgs)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8 if multilabel else np.int64)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


# -- encoded images --------------------------------------------------------------------------------
def _uint8(pixels: np.ndarray) -> np.ndarray:
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return a


def encode_png(pixels: np.ndarray) -> bytes:
    """[H, W] or [H, W, 3] uint8 (or float in [0, 1]) → PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_uint8(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_uint8(pixels)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12) -> bytes:
    """[H, W] grey (uint16, or float in [0, 1] scaled to bits_stored) → a minimal Secondary Capture DICOM."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    a = np.asarray(pixels)
    if a.ndim != 2:
        raise ValueError("DICOM samples here are greyscale [H, W]")
    if a.dtype != np.uint16:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * (2 ** bits_stored - 1)).round().astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("sample.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = a.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_image_files(pixels: np.ndarray, stem: str | Path) -> list[Path]:
    """One image as ``STEM.png``, ``STEM.jpg`` and, for a grey image, ``STEM.dcm`` (DICOM here is
    greyscale only); the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    encoders = {".png": encode_png, ".jpg": encode_jpeg}
    if np.asarray(pixels).ndim == 2:
        encoders[".dcm"] = lambda a: encode_dicom(_uint8(a).astype(np.float32) / 255.0)
    paths = []
    for suffix, encode in encoders.items():
        path = stem.with_name(stem.name + suffix)
        path.write_bytes(encode(pixels))
        paths.append(path)
    return paths


def random_image(seed: int, size: int = 48, rgb: bool = True) -> np.ndarray:
    """A textured, non-constant uint8 image (so every pixel path is exercised)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(2 * np.pi * (2 + seed % 4) * (xx + 0.3 * yy)) + 0.1 * rng.standard_normal((size, size))
    if rgb:
        base = np.stack([base, base * 0.8 + 0.1, base * 0.9], -1) + 0.05 * rng.standard_normal((size, size, 3))
    return (np.clip(base, 0, 1) * 255).astype(np.uint8)
