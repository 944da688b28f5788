"""PNG and JPEG through Pillow, bounded: the size checked from the header, the pixels kept small.

Without a target size the image is decoded whole (its size already checked) and converted by
:func:`pil_to_array`. With one, the full-resolution image is kept as small as the format allows:

* a non-interlaced PNG is streamed band by band (png_stream), never whole;
* a large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (:func:`_draft_jpeg`);
* what is left (an interlaced or 16-bit colour PNG, a JPEG at its reduced scale) is decoded by
  Pillow whole, then resized band by band, so only one band of it is ever in float.

Values are scaled by the format's bit depth, never by the image's content: a 16-bit grey PNG is
value/65535 even when its brightest pixel is dark (a mostly black radiograph must not be read 257×
brighter), everything else value/255 (Pillow keeps the high byte of 16-bit colour).

Pillow's own errors are left to the caller (imaging) to turn into one line.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

from PIL import Image

from ..config import MAX_IMAGE_PIXELS
from . import codestream
from .bands import Budget, band_rows, sink_for
from .png_stream import PngStream

# Pillow's own bomb limit (179 Mpx by default) is what pydicom's Pillow plugins meet (a DICOM JPEG or
# JPEG 2000 frame, after codestream.check_frame): the server's limit instead, a backstop behind ours
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_JPEG_DRAFT_MULTIPLE = 4  # a large JPEG is decoded at >= 4 x target_size a side (see _draft_jpeg)
_PIL_16BIT = ("I;16", "I;16B", "I;16L", "I")


def decode(data: bytes, fmt: str, budget: Budget, target_size: int | None) -> np.ndarray:
    """PNG or JPEG bytes (``fmt``: 'png' or 'jpeg') → float32 [H, W] or [H, W, 3] in [0, 1]."""
    what = fmt.upper()
    im = _open_pil(data, fmt)
    budget.check_size(what, im.width, im.height)
    if fmt == "jpeg":
        codestream.jpeg_scans(data)  # a progressive JPEG of thousands of scans is refused before decoding
    if target_size is None:
        im.load()
        budget.check_time(f"after decoding the {what} image")
        return pil_to_array(im)
    stream = PngStream.open(data) if fmt == "png" else None
    if stream is not None:
        sink = sink_for(stream.height, stream.width, target_size)
        for band in stream.bands(budget):
            sink.add(band)
        return sink.result() / np.float32(_png_scale(stream))
    if fmt == "jpeg":
        _draft_jpeg(im, target_size)
    im.load()
    budget.check_time(f"after decoding the {what} image")
    sink = sink_for(im.height, im.width, target_size)
    for band in _pil_bands(im, budget):
        sink.add(band)
    return sink.result() / np.float32(_pil_scale(im.mode))


def _open_pil(data: bytes, fmt: str):
    """The header only, by the plugin of the sniffed format.

    Not Image.open: the format is already known from the content, and Image.open applies Pillow's
    own bomb limit (MAX_IMAGE_PIXELS), which prints a warning with a source line to stderr, or
    refuses, by a limit other than ours; ours is checked right after, from the same header.
    """
    from PIL import JpegImagePlugin, PngImagePlugin

    plugin = PngImagePlugin.PngImageFile if fmt == "png" else JpegImagePlugin.JpegImageFile
    return plugin(io.BytesIO(data))


def _draft_jpeg(im, target_size: int) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling: memory and time shrink
    by the square), staying >= _JPEG_DRAFT_MULTIPLE × target_size a side so the final antialiased
    resize still does most of the filtering: about 1e-3 from the full decode on a smooth image."""
    want = _JPEG_DRAFT_MULTIPLE * target_size
    im.draft(im.mode, (want, want))  # Pillow picks the largest scale that keeps both sides >= want


def pil_to_array(im) -> np.ndarray:
    """A decoded Pillow image → float32 in [0, 1]: grey as [H, W], anything else as RGB [H, W, 3]."""
    if im.mode in _PIL_16BIT:
        return (np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 65535.0).astype(np.float32)
    if im.mode in ("L", "1", "P", "LA"):
        im = im.convert("L") if im.mode != "P" else im.convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0


def _pil_bands(im, budget: Budget) -> Iterator[np.ndarray]:
    """A decoded Pillow image, band by band, in pil_to_array's modes but not yet scaled to [0, 1]."""
    rows = band_rows(im.width, 3)
    for y in range(0, im.height, rows):
        band = im.crop((0, y, im.width, min(y + rows, im.height)))
        if im.mode in _PIL_16BIT:
            yield np.clip(np.asarray(band, dtype=np.float32), 0, 65535)
        else:
            yield np.asarray(band.convert("L" if im.mode in ("L", "1", "LA") else "RGB"))
        budget.check_time(f"at row {y} of {im.height}")


def _pil_scale(mode: str) -> float:
    """pil_to_array's divisor, by bit depth: Pillow's 16-bit modes hold 16-bit samples."""
    return 65535.0 if mode in _PIL_16BIT else 255.0


def _png_scale(stream: PngStream) -> float:
    """The streamed PNG's divisor, by bit depth: its bands keep 16-bit samples only for 16-bit grey."""
    return 65535.0 if stream.depth == 16 and stream.color_type == 0 else 255.0
