"""A non-interlaced PNG read one band of rows at a time, never whole.

Pillow decodes a PNG whole: a 6000 × 6000 RGB image is 100 MB of pixels before any resize. Here
the IDAT stream is inflated only as far as the band needs, and each band comes out in the values
Pillow would give (``pil.pil_to_array``'s modes, not yet scaled to [0, 1]), so the banded
result equals the whole-image one.

Unfiltering is still Pillow's: each band is unfiltered from a small PNG of its own, the band's
filtered rows after one unfiltered row (filter 0) that repeats the previous band's last row,
which the Up, Average and Paeth filters refer to. Interlaced images (Adam7 passes cannot be
banded) and 16-bit colour (6 or 8 bytes a pixel: no 8-bit stand-in) are left to Pillow whole
(:meth:`PngStream.open` returns None).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np

from ..errors import BadImageError
from .bands import Budget, band_rows
from .inflate import Inflater

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# An 8-bit colour type whose pixel has the same byte count: PNG unfiltering depends only on the
# bytes per pixel, so a band unfiltered as this type comes out as the original raw bytes.
_PNG_STAND_IN = {1: 0, 2: 4, 3: 2, 4: 6}


class PngStream:
    """The header of a bandable PNG, and its rows band by band (:meth:`bands`)."""

    def __init__(self, width: int, height: int, depth: int, color_type: int, palette: bytes, idat: list):
        self.width, self.height, self.depth, self.color_type = width, height, depth, color_type
        self.row_bytes = (width * _PNG_CHANNELS[color_type] * depth + 7) // 8
        self._pixel_bytes = _png_pixel_bytes(color_type, depth)
        self._idat = idat
        # Pillow converts a palette image to RGB through a 256-entry palette, absent entries black
        self._palette = np.zeros((256, 3), np.uint8)
        entries = min(len(palette) // 3, 256)
        self._palette[:entries] = np.frombuffer(palette, np.uint8, count=3 * entries).reshape(-1, 3)

    @classmethod
    def open(cls, data: bytes) -> PngStream | None:
        """The stream of a PNG that can be banded; None for one that Pillow must decode whole."""
        ihdr, palette, idat = _png_chunks(data)
        if ihdr is None or len(ihdr) != 13:
            return None
        width, height, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", ihdr)
        if compression or filtering or interlace or depth not in _PNG_DEPTHS.get(color_type, ()):
            return None
        if _png_pixel_bytes(color_type, depth) not in _PNG_STAND_IN or (color_type == 3 and not palette):
            return None
        return cls(width, height, depth, color_type, palette, idat)

    def scale(self, hi: float) -> float:
        """pil_to_array's divisor: 16-bit grey that never exceeds 255 is taken as 8-bit."""
        return (65535.0 if hi > 255 else 255.0) if self.depth == 16 and self.color_type == 0 else 255.0

    def bands(self, budget: Budget) -> Iterator[np.ndarray]:
        stream = Inflater(self._idat, zlib.MAX_WBITS)
        above = bytes(self.row_bytes)  # the row above the first one is zeros (PNG spec)
        rows = band_rows(self.width, 3)
        for y in range(0, self.height, rows):
            n = min(rows, self.height - y)
            filtered = stream.read(n * (1 + self.row_bytes))
            if len(filtered) < n * (1 + self.row_bytes):
                raise BadImageError(f"cannot decode PNG image: the image data ends at row "
                                    f"{y + len(filtered) // (1 + self.row_bytes)} of {self.height}")
            raw = self._unfilter(above, filtered, n)
            above = raw[-1].tobytes()
            yield self._pixels(raw)
            budget.check_time(f"at row {y + n} of {self.height}")

    def _unfilter(self, above: bytes, filtered: bytes, n: int) -> np.ndarray:
        from PIL import PngImagePlugin

        width = self.row_bytes // self._pixel_bytes
        ihdr = struct.pack(">IIBBBBB", width, n + 1, 8, _PNG_STAND_IN[self._pixel_bytes], 0, 0, 0)
        idat = zlib.compress(b"\x00" + above + filtered, 0)  # stored: Pillow only needs a valid stream
        png = _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
        with PngImagePlugin.PngImageFile(io.BytesIO(png)) as im:
            im.load()
            return np.asarray(im).reshape(n + 1, self.row_bytes)[1:]

    def _pixels(self, raw: np.ndarray) -> np.ndarray:
        """Raw rows → Pillow's values (uint8 or uint16) for the mode pil_to_array makes of this PNG."""
        n, w, depth, ct = len(raw), self.width, self.depth, self.color_type
        if depth < 8:
            bits = np.unpackbits(raw, axis=1)[:, :w * depth].reshape(n, w, depth)
            values = bits @ (1 << np.arange(depth - 1, -1, -1))
            if ct == 3:
                return self._palette[values]
            return (values * (255 // (2 ** depth - 1))).astype(np.uint8)  # Pillow scales 1/2/4-bit grey
        if ct == 0:
            return raw.view(">u2") if depth == 16 else raw
        if ct == 3:
            return self._palette[raw]
        pixel = raw.reshape(n, w, _PNG_CHANNELS[ct], depth // 8)[..., 0]  # Pillow keeps 16-bit colour's high byte
        return pixel[..., 0] if ct == 4 else pixel[..., :3]


def _png_pixel_bytes(color_type: int, depth: int) -> int:
    """Bytes per complete pixel, the unit of PNG filtering (1 below 8 bits)."""
    return max(1, _PNG_CHANNELS[color_type] * depth // 8)


def _png_chunks(data: bytes) -> tuple[bytes | None, bytes, list[memoryview]]:
    """IHDR payload, PLTE payload and the IDAT payloads of a PNG (CRCs are not checked)."""
    view, pos = memoryview(data), 8
    ihdr, palette, idat = None, b"", []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = view[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = bytes(payload)
        elif kind == b"PLTE":
            palette = bytes(payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
    return ihdr, palette, idat


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
