"""PNG samples are scaled by their bit depth, not by the image's content: a dark 16-bit image stays dark,
on the whole-image path, the streamed path and Pillow's whole-decode path (interlaced)."""

import struct
import zlib

import numpy as np
import pytest

from medlego.runtime.imaging import decode_image


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _grey_png(values: np.ndarray, depth: int, interlaced: bool = False) -> bytes:
    """A greyscale PNG of `values` at `depth` bits (filter 0; Adam7 passes when interlaced)."""
    h, w = values.shape
    dtype = ">u2" if depth == 16 else np.uint8
    if interlaced:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        rows = [values[y, x0::dx] for x0, y0, dx, dy in passes for y in range(y0, h, dy) if len(range(x0, w, dx))]
    else:
        rows = list(values)
    raw = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, int(interlaced))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _dark(seed=0, h=40, w=56) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 250, (h, w)).astype(np.uint16)  # every value ≤ 255


@pytest.mark.parametrize("interlaced", [False, True])
def test_16bit_grey_is_value_over_65535_whatever_its_maximum(interlaced):
    dark = _dark()
    got = decode_image(_grey_png(dark, 16, interlaced))
    assert np.allclose(got, dark / 65535.0, atol=1e-7)  # not dark / 255: that would be 257× too bright
    one_bright = dark.copy()
    one_bright[3, 5] = 60000
    got_bright = decode_image(_grey_png(one_bright, 16, interlaced))
    mask = np.ones_like(dark, dtype=bool)
    mask[3, 5] = False
    assert np.array_equal(got_bright[mask], got[mask])  # one pixel does not rescale the others


@pytest.mark.parametrize("interlaced", [False, True])
def test_reduced_16bit_grey_keeps_the_scale(interlaced):
    """With a target size (the streamed path, or Pillow whole + bands): the same scale as the full decode."""
    dark = np.kron(_dark(1, 20, 28), np.ones((2, 2), dtype=np.uint16))  # smooth enough that a resize keeps the mean
    small = decode_image(_grey_png(dark, 16, interlaced), target_size=14)
    assert small.shape == (14, 14)
    assert small.max() < 255 / 65535 + 1e-6 and small.mean() == pytest.approx(dark.mean() / 65535.0, rel=0.05)


def test_8bit_grey_is_value_over_255():
    values = _dark(2).astype(np.uint8)
    assert np.allclose(decode_image(_grey_png(values, 8)), values / 255.0, atol=1e-7)
    assert np.allclose(decode_image(_grey_png(values, 8), target_size=14).mean(), values.mean() / 255.0, rtol=0.05)
