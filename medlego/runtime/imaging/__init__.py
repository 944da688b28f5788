"""Image decoding (PNG, JPEG, DICOM; chosen by content, never by name) and the adapter's preprocessing.

The public API of image handling; the decoders behind it each live in a file of their own.

Preprocessing is exactly what the adapter format specifies: RGB (grey replicated, alpha
dropped) → resize to input_size × input_size (bilinear, antialiased when shrinking, no crop, so a
finding at the border survives; an image already at that size is not resampled) → [0, 1] →
(x − mean) / std.

Decoding is bounded in memory and time whatever the bytes are:

* sizes come from the header and are checked (width × height × frames against ``max_pixels``,
  each side against ``max_side``) before any pixel data is read, inflated or decompressed;
* with ``target_size`` (what a server passes: the adapter's input size) rows are decoded a band at
  a time and resized band by band (bands), so the full-resolution float image never exists:
  PNG rows are inflated only as far as the band needs (png_stream), a large JPEG is decoded
  by libjpeg at 1/2, 1/4 or 1/8 scale (imaging/pil.py), a DICOM frame is read (or inflated) band by
  band (imaging/dicom.py). The result is :func:`preprocess`'s resize of the full image: identical up to
  float rounding, and within DCT scaling for a large JPEG;
* DICOM: the header is walked with its elements counted (dicom_elements) and only the elements
  the decoder reads are parsed; only the first frame is decoded; a deflated data set is inflated
  only as far as its header and first frame need, and refused when its header or pixel data is
  bigger than its geometry allows; rescale, window and LUT values are validated (dicom_header,
  dicom_values); a compressed frame's own codestream (codestream: JPEG and JPEG-LS SOF, JPEG 2000
  SIZ) must match the header before any decoder sees it, RLE is decoded here segment by segment,
  never past its frame (rle), and a transfer syntax whose cost is not bounded so is refused;
* a JPEG upload of more than codestream.MAX_SCANS scans is refused; Pillow's own bomb limit is
  the server's default ``MAX_IMAGE_PIXELS`` (pil);
* ``deadline_s`` is checked between stages and bands (C code is not interrupted, but every stage
  works on a bounded size, so each one is short).

A bad image is a one-line :class:`BadImageError` (400). An image too costly to decode (a header
flood, or a decode whose thread computed for most of its deadline) is an
:class:`ImageTooCostlyError` (422: the input is the cause, a retry would not help). A decode that
runs past its deadline while mostly waiting is a one-line :class:`OverloadedError` (503, retry):
a busy server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import dicom, pil
from ..config import DECODE_DEADLINE_S, MAX_IMAGE_PIXELS
from ..errors import BadImageError, MedlegoError
from .bands import Budget, bilinear

if TYPE_CHECKING:
    from ..adapter import Preprocess


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from magic bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, target_size: int | None = None,
                 deadline_s: float | None = DECODE_DEADLINE_S, max_side: int | None = None) -> np.ndarray:
    """Bytes → float32 array in [0, 1], [H, W] (grey) or [H, W, 3] (RGB).

    ``target_size``: the model's input side (the adapter's ``preprocess.input_size``). With it the
    result is already target_size × target_size, resized exactly as :func:`preprocess` would
    (which then leaves it as it is), and decoding never holds the full-resolution float image.
    Without it: the image at full resolution.
    ``deadline_s``: decoding stops with an :class:`OverloadedError` after this long (None: never).
    ``max_side``: the largest width or height accepted (None: any), checked from the header.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImageError("unsupported image format: expected PNG, JPEG or DICOM content")
    if target_size is not None and target_size < 1:
        raise ValueError(f"target_size must be a positive number of pixels, got {target_size}")
    return _decode(data, fmt, Budget(max_pixels, max_side, deadline_s), target_size)


def decode_dicom(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, target_size: int | None = None,
                 deadline_s: float | None = DECODE_DEADLINE_S, max_side: int | None = None) -> np.ndarray:
    """DICOM → [0, 1], first frame: rescale slope/intercept (or Modality LUT), window (or VOI LUT)
    if a window is present, MONOCHROME1 inverted; RGB/YBR colour scaled by BitsStored.

    Parsed from memory with pydicom; nothing executed, no external references followed.
    Options as in :func:`decode_image`.
    """
    return _decode(data, "dicom", Budget(max_pixels, max_side, deadline_s), target_size)


def check_dicom_header(data: bytes, *, deadline_s: float | None = DECODE_DEADLINE_S, any_syntax: bool = False) -> None:
    """Walk a DICOM file's header within the decoder's bounds (elements counted, the deadline, a deflated
    header inflated only as far as its cap), parsing nothing: :class:`ImageTooCostlyError` for a flood,
    :class:`BadImageError` for a garbled header or (unless ``any_syntax``) a transfer syntax the decoder
    does not bound. For readers that parse the whole header afterwards (the DICOM doors)."""
    try:
        dicom.check_header(data, Budget(MAX_IMAGE_PIXELS, None, deadline_s), any_syntax)
    except MedlegoError:
        raise
    except Exception as e:  # odd bytes in the file meta
        raise BadImageError(f"cannot read DICOM header: {_first_line(e)}") from None


def load_image_file(path, *, max_pixels: int = MAX_IMAGE_PIXELS, target_size: int | None = None,
                    deadline_s: float | None = None) -> np.ndarray:
    """A local file (datasets, the CLI): no deadline unless one is given; sizes are bounded all the same."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), max_pixels=max_pixels, target_size=target_size, deadline_s=deadline_s)


def _decode(data: bytes, fmt: str, budget: Budget, target_size: int | None) -> np.ndarray:
    try:
        if fmt == "dicom":
            return dicom.decode(data, budget, target_size)
        return pil.decode(data, fmt, budget, target_size)
    except MedlegoError:
        raise
    except Exception as e:  # whatever Pillow or pydicom raise on odd bytes: a one-line 400, never a 500
        raise BadImageError(f"cannot decode {fmt.upper()} image: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__


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
        t = bilinear(t, (s, s), antialias=t.shape[1] > s or t.shape[2] > s)
    t = t.clamp(0.0, 1.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (t - mean) / std
