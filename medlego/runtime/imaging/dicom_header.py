"""DICOM header values, validated before any pixel is read.

pydicom converts a value when it is accessed, and an odd one (an IS that is not a number, a
multi-valued slope, a NaN intercept) surfaces as a warning, a traceback or nonsense pixels. The
readers here turn every header value the decoder uses into a checked number, or a one-line
:class:`BadImageError` that names the element, and :class:`Frame` is the Image Pixel geometry
built from them, with the transfer syntax checked to be one whose cost is bounded before
decoding (:data:`BOUNDED_SYNTAXES`) and that pydicom can decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import BadImageError


@dataclass
class Frame:
    """The Image Pixel geometry of a DICOM data set, validated."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    frames: int
    photometric: str
    planar: int
    syntax: Any  # pydicom UID

    @classmethod
    def of(cls, ds) -> Frame:
        samples = dicom_int(ds, "SamplesPerPixel", 1)
        if samples not in (1, 3):
            raise BadImageError(f"cannot decode DICOM image: SamplesPerPixel must be 1 or 3, got {samples}")
        bits = dicom_int(ds, "BitsAllocated")
        if bits not in (1, 8, 16, 32):
            raise BadImageError(f"cannot decode DICOM image: BitsAllocated must be 1, 8, 16 or 32, got {bits}")
        stored = dicom_int(ds, "BitsStored", bits)
        if not 1 <= stored <= bits:
            raise BadImageError(f"cannot decode DICOM image: BitsStored {stored} does not fit BitsAllocated {bits}")
        frames = dicom_int(ds, "NumberOfFrames", 1) or 1  # absent, empty or 0: one frame, as pydicom reads it
        if frames < 0:
            raise BadImageError(f"cannot decode DICOM image: NumberOfFrames is {frames}")
        frame = cls(dicom_int(ds, "Rows"), dicom_int(ds, "Columns"), samples, bits, stored, frames,
                    str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
                    dicom_int(ds, "PlanarConfiguration", 0) if samples > 1 else 0, ds.file_meta.TransferSyntaxUID)
        _check_syntax(frame.syntax)
        return frame

    @property
    def row_bits(self) -> int:
        samples = 2 if self.photometric == "YBR_FULL_422" else self.samples  # Y Y Cb Cr per two pixels
        return self.columns * samples * self.bits_allocated

    @property
    def frame_bytes(self) -> int:
        return -(-self.rows * self.row_bits // 8)


# every transfer syntax whose decoding cost is bounded before decoding (dicom.py, codestream.py, rle.py)
BOUNDED_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",  # native, deflated
    "1.2.840.10008.1.2.5",  # RLE Lossless: decoded here, each segment bounded by its frame
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
})


def check_bounded(syntax) -> None:
    """A one-line 400 naming a transfer syntax not in BOUNDED_SYNTAXES (``syntax``: a pydicom UID)."""
    if str(syntax) not in BOUNDED_SYNTAXES:
        raise BadImageError(f"cannot decode DICOM image: transfer syntax {syntax.name} ({syntax}) is not supported "
                            "(its decoding cost cannot be checked before decoding)")


def _check_syntax(syntax) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    check_bounded(syntax)
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise BadImageError(f"cannot decode DICOM image: transfer syntax {syntax.name} ({syntax}) is not supported")


def dicom_int(ds, keyword: str, default: int | None = None) -> int:
    """An IS/US value as an int; ``default`` when absent or empty (None: the element is required)."""
    try:
        value = ds[keyword].value if keyword in ds else None
    except Exception:  # pydicom converts on access: an IS/US value that is not a number
        raise BadImageError(f"cannot decode DICOM image: {keyword} is not a whole number") from None
    if value is None or value == "":
        if default is None:
            raise BadImageError(f"cannot decode DICOM image: the header has no {keyword}")
        return default
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        raise BadImageError(f"cannot decode DICOM image: {keyword} must be one number, got {short_repr(value)}")
    try:
        number = float(value)
    except ValueError:
        raise BadImageError(f"cannot decode DICOM image: {keyword} is not a whole number: {short_repr(value)}") from None
    if not number.is_integer():
        raise BadImageError(f"cannot decode DICOM image: {keyword} is not a whole number: {short_repr(value)}")
    return int(number)


def dicom_number(ds, keyword: str, *, first: bool = False) -> float | None:
    """A DS value as a finite float; None when absent or empty. ``first``: of a multi-valued one
    (a window may list several alternatives; pydicom uses the first)."""
    try:
        value = ds[keyword].value if keyword in ds else None
    except Exception:
        raise BadImageError(f"cannot decode DICOM image: {keyword} is not a number") from None
    if not isinstance(value, (int, float, str)) and value is not None:  # a multi-value
        values = list(value)
        if not first or not values:
            raise BadImageError(f"cannot decode DICOM image: {keyword} must be one number, got {short_repr(value)}")
        value = values[0]
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadImageError(f"cannot decode DICOM image: {keyword} is not a number: {short_repr(value)}") from None
    if not math.isfinite(number):
        raise BadImageError(f"cannot decode DICOM image: {keyword} is {number}")
    return number


def dicom_items(ds, keyword: str) -> list:
    """The items of a sequence; [] when absent or empty."""
    try:
        seq = ds.get(keyword)
        return list(seq) if seq else []
    except Exception:
        raise BadImageError(f"cannot decode DICOM image: {keyword} is malformed") from None


def short_repr(value) -> str:
    """A header value as an error message shows it: at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
