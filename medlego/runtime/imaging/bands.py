"""The limits of one decode, and where its rows go: band by band, into the full image or the resize.

Every decoder (pil, png_stream, dicom) produces an image as bands of rows of a
bounded size (:func:`band_rows`) and hands them to a :class:`Sink`. With a target size the sink
resizes each band as it arrives, so the full-resolution float image never exists. The resize is
:func:`bilinear`, the one resize of the package: :func:`medlego.runtime.imaging.preprocess` uses it
too, which is why a banded decode gives preprocess's numbers.

:class:`Budget` holds the limits a decoder checks as it goes: sizes from the header, before any
pixel is read, and the deadline between stages and bands.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadImageError, ImageTooCostlyError, OverloadedError

_BAND_BYTES = 4 * 1024 * 1024  # float64 working set of one band of rows
_COSTLY_CPU_SHARE = 0.2  # a decode past its deadline that computed for this share of it: the image's fault
_COSTLY_CPU_MIN_S = 0.1  # ... and for at least this long (a deadline of 0 is a busy server's)


class Budget:
    """The limits of one decode: pixels, side length and a deadline."""

    def __init__(self, max_pixels: int, max_side: int | None, deadline_s: float | None):
        self.max_pixels, self.max_side, self.deadline_s = max_pixels, max_side, deadline_s
        self._end = None if deadline_s is None else time.monotonic() + deadline_s
        self._cpu0 = time.thread_time()  # a Budget is made and checked in the thread that decodes

    def check_size(self, what: str, width: int, height: int, frames: int = 1) -> None:
        if width < 1 or height < 1:
            raise BadImageError(f"{what} image has no pixels ({width}x{height})")
        if self.max_side is not None and max(width, height) > self.max_side:
            raise BadImageError(f"{what} image is {width}x{height}; the largest side allowed is {self.max_side} pixels")
        if width * height * frames > self.max_pixels:
            shape = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
            raise BadImageError(f"{what} image is {shape}, above the limit of {self.max_pixels} pixels")

    def check_time(self, stage: str) -> None:
        """Past the deadline: the image's fault (422) when this thread spent most of the time
        computing on it, else a busy server's (503, retry)."""
        if self._end is None or time.monotonic() <= self._end:
            return
        cpu = time.thread_time() - self._cpu0
        if cpu > max(_COSTLY_CPU_SHARE * self.deadline_s, _COSTLY_CPU_MIN_S):
            raise ImageTooCostlyError(f"image decoding used {cpu:.1f} s of CPU, past the deadline of "
                                      f"{self.deadline_s:g} s (stopped {stage}): the image is too costly to decode")
        raise OverloadedError(f"image decoding took longer than {self.deadline_s:g} s (stopped {stage}); "
                              "the server is busy, retry later")


def band_rows(width: int, channels: int) -> int:
    """Rows per band: as many as keep one band of float64 values within _BAND_BYTES."""
    return max(1, _BAND_BYTES // (8 * width * channels))


class Sink:
    """Where a decoded image goes, band of rows after band of rows; tracks the range of the values
    (a DICOM is normalised by its full-resolution minimum and maximum)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.lo, self.hi = math.inf, -math.inf
        self._at = 0  # rows added so far

    def add(self, band: np.ndarray) -> None:
        self.lo, self.hi = min(self.lo, float(band.min())), max(self.hi, float(band.max()))
        self._put(band)
        self._at += len(band)

    def _put(self, band: np.ndarray) -> None:
        raise NotImplementedError

    def result(self) -> np.ndarray:
        raise NotImplementedError


def sink_for(height: int, width: int, target_size: int | None) -> Sink:
    """The full image without a target size, else its resize to target_size × target_size."""
    return _Full(height, width) if target_size is None else _Resize(height, width, target_size)


class _Full(Sink):
    """→ the full-resolution float32 image (no target size)."""

    _image: np.ndarray | None = None

    def _put(self, band: np.ndarray) -> None:
        if self._image is None:
            self._image = np.empty((self.height,) + band.shape[1:], np.float32)
        self._image[self._at:self._at + len(band)] = band

    def result(self) -> np.ndarray:
        assert self._image is not None and self._at == self.height, "every row must be added"
        return self._image


class _Resize(Sink):
    """→ the size × size image, resized as :func:`medlego.runtime.imaging.preprocess` resizes.

    The antialiased bilinear resize is separable and torch runs it as a horizontal pass, then a
    vertical one; doing the horizontal pass band by band and the vertical one on the
    [channels, height, size] result gives the same numbers while only one band of the
    full-resolution image is ever in float.
    """

    def __init__(self, height: int, width: int, size: int):
        super().__init__(height, width)
        self.size = size
        self.antialias = height > size or width > size  # as preprocess: shrinking in either direction
        self._rows: torch.Tensor | None = None

    def _put(self, band: np.ndarray) -> None:
        # one channel at a time: a contiguous float32 [1, rows, W] is what preprocess resizes too,
        # and converting each channel from uint8 costs less than transposing the float band
        channels = [band] if band.ndim == 2 else [band[..., c] for c in range(band.shape[2])]
        if self._rows is None:
            self._rows = torch.empty(len(channels), self.height, self.size)
        for c, plane in enumerate(channels):
            t = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32)).unsqueeze(0)
            if self.width != self.size:
                t = bilinear(t, (len(band), self.size), self.antialias)
            self._rows[c, self._at:self._at + len(band)] = t[0]

    def result(self) -> np.ndarray:
        assert self._rows is not None and self._at == self.height, "every row must be added"
        t = self._rows
        if self.height != self.size:
            t = bilinear(t, (self.size, self.size), self.antialias)
        return (t[0] if t.shape[0] == 1 else t.permute(1, 2, 0)).contiguous().numpy()


def bilinear(t: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """[C, H, W] → [C, *size]: the one resize of the package (preprocess and the banded decode)."""
    return F.interpolate(t.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                         antialias=antialias).squeeze(0)
