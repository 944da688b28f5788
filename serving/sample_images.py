"""Encode arrays as PNG, JPEG or DICOM bytes (the demo, the load benchmark and the tests send these)."""

from __future__ import annotations

import io

import numpy as np


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


def random_image(seed: int, size: int = 48, rgb: bool = True) -> np.ndarray:
    """A textured, non-constant uint8 image (so every pixel path is exercised)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(2 * np.pi * (2 + seed % 4) * (xx + 0.3 * yy)) + 0.1 * rng.standard_normal((size, size))
    if rgb:
        base = np.stack([base, base * 0.8 + 0.1, base * 0.9], -1) + 0.05 * rng.standard_normal((size, size, 3))
    return (np.clip(base, 0, 1) * 255).astype(np.uint8)
