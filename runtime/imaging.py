"""Image decoding (PNG, JPEG, DICOM; chosen by content, never by name) and the adapter's preprocessing.

Preprocessing is exactly what the adapter format specifies: RGB (grey replicated, alpha
dropped) → resize to input_size × input_size (bilinear, antialiased when shrinking, no crop, so a
finding at the border survives; an image already at that size is not resampled) → [0, 1] →
(x − mean) / std.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import Preprocess
from .errors import BadImageError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # decompression-bomb guard (64 Mpx)


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from magic bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes → float32 array in [0, 1], [H, W] (grey) or [H, W, 3] (RGB)."""
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImageError("unsupported image format: expected PNG, JPEG or DICOM content")
    if fmt == "dicom":
        return decode_dicom(data, max_pixels=max_pixels)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise BadImageError(f"image is {im.width}x{im.height}, above the limit of {max_pixels} pixels")
            im.load()
            return pil_to_array(im)
    except BadImageError:
        raise
    except Exception as e:
        raise BadImageError(f"cannot decode {fmt.upper()} image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def pil_to_array(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        return (np.clip(arr, 0, hi) / hi).astype(np.float32)
    if im.mode in ("L", "1", "P", "LA"):
        im = im.convert("L") if im.mode != "P" else im.convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0


def decode_dicom(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """DICOM → [0, 1]: rescale slope/intercept, window (VOI LUT) if present, MONOCHROME1 inverted.

    Parsed from memory with pydicom; nothing executed, no external references followed.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > max_pixels:
            raise BadImageError(f"DICOM image is {cols}x{rows}, above the limit of {max_pixels} pixels")
        arr = ds.pixel_array
    except BadImageError:
        raise
    except Exception as e:
        raise BadImageError(f"cannot decode DICOM image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB / YBR colour DICOM
        return _to_unit(arr.astype(np.float64), float(2 ** int(getattr(ds, "BitsStored", 8)) - 1), 0.0)
    if arr.ndim != 2:
        arr = arr[0]  # multi-frame: the first frame
    img = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        img = apply_voi_lut(img, ds).astype(np.float64)
    lo, hi = float(img.min()), float(img.max())
    out = _to_unit(img, hi, lo)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _to_unit(img: np.ndarray, hi: float, lo: float) -> np.ndarray:
    span = hi - lo
    if span <= 0:
        return np.zeros_like(img, dtype=np.float32)
    return ((img - lo) / span).astype(np.float32)


def to_chw(image) -> torch.Tensor:
    """An array/tensor image → float32 [3, H, W] in [0, 1] (grey replicated, alpha dropped)."""
    t = torch.as_tensor(np.asarray(image))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():  # 16-bit greyscale (PNG I;16, DICOM already scaled upstream)
        t = t.float() / 65535.0
    else:
        t = t.float()
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(3, -1, -1)
    elif t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3):
        t = t.permute(2, 0, 1)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise BadImageError(f"image array has shape {tuple(np.asarray(image).shape)}, expected HxW, HxWxC or CxHxW")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    return t.contiguous()


def preprocess(image, spec: Preprocess) -> torch.Tensor:
    """Decoded image (array in [0, 1] or uint8) → normalised float32 [3, S, S]."""
    t = to_chw(image)
    s = spec.input_size
    if tuple(t.shape[1:]) != (s, s):
        shrink = t.shape[1] > s or t.shape[2] > s
        t = F.interpolate(t.unsqueeze(0), size=(s, s), mode="bilinear", align_corners=False,
                          antialias=shrink).squeeze(0)
    t = t.clamp(0.0, 1.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (t - mean) / std


def load_image_file(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode_image(fh.read(), max_pixels=max_pixels)
