"""The values of a greyscale DICOM: the modality transform, then the VOI transform.

Computed as pydicom's ``apply_modality_lut`` and ``apply_voi_lut`` compute them on the whole
array, but with every header value validated first (dicom_header), so that an odd value is
a one-line refusal before any pixel is read. Both transforms are per pixel, so
:meth:`GreyValues.apply` runs on one band of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import BadImageError
from .dicom_header import Frame, dicom_int, dicom_items, dicom_number, short_repr


@dataclass
class GreyValues:
    """Stored values → output values: the modality transform (rescale or Modality LUT), then the
    VOI transform (window or VOI LUT); either may be absent."""

    modality: Callable[[np.ndarray], np.ndarray] | None
    voi: Callable[[np.ndarray], np.ndarray] | None

    @classmethod
    def of(cls, ds, frame: Frame) -> GreyValues:
        little_endian = frame.syntax.is_little_endian
        modality: Callable[[np.ndarray], np.ndarray] | None = None
        if dicom_items(ds, "ModalityLUTSequence"):
            modality = _lut(dicom_items(ds, "ModalityLUTSequence")[0], "Modality", little_endian)
        else:
            rescale = dicom_number(ds, "RescaleSlope"), dicom_number(ds, "RescaleIntercept")
            if rescale[0] is not None and rescale[1] is not None:
                modality = _Rescale(rescale[0], rescale[1])
        voi = None
        if "WindowCenter" in ds and "WindowWidth" in ds:  # as before: a VOI transform only with a window
            voi = _voi(ds, frame, little_endian)
        return cls(modality, voi)

    def apply(self, band: np.ndarray) -> np.ndarray:
        values = self.modality(band) if self.modality else band
        values = values.astype(np.float64)
        return self.voi(values) if self.voi else values


def _voi(ds, frame: Frame, little_endian: bool):
    """pydicom's apply_voi_lut(prefer_lut=True): the VOI LUT Sequence if it is complete, else the window."""
    items = dicom_items(ds, "VOILUTSequence")
    if items and "LUTDescriptor" in items[0] and "LUTData" in items[0]:
        return _lut(items[0], "VOI", little_endian)
    center = dicom_number(ds, "WindowCenter", first=True)
    width = dicom_number(ds, "WindowWidth", first=True)
    if center is None or width is None:
        return None
    if frame.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImageError(f"cannot decode DICOM image: a window needs MONOCHROME1 or MONOCHROME2, "
                            f"not {frame.photometric}")
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise BadImageError(f"cannot decode DICOM image: VOILUTFunction {short_repr(function)} is not supported")
    if function == "LINEAR" and width < 1:
        raise BadImageError(f"cannot decode DICOM image: WindowWidth must be at least 1, got {width:g}")
    if width <= 0:
        raise BadImageError(f"cannot decode DICOM image: WindowWidth must be above 0, got {width:g}")
    return _Window(center, width, function, *_window_range(ds, frame))


def _window_range(ds, frame: Frame) -> tuple[float, float]:
    """The window's output range, as pydicom's apply_windowing: the stored range (or the Modality
    LUT's), through the rescale when there is one."""
    items = dicom_items(ds, "ModalityLUTSequence")
    pixel_representation = dicom_int(ds, "PixelRepresentation", 0)
    if items:
        y_min, y_max = 0.0, float(2 ** _lut_descriptor(items[0], "Modality")[2] - 1)
    elif pixel_representation == 0:
        y_min, y_max = 0.0, float(2 ** frame.bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (frame.bits_stored - 1))), float(2 ** (frame.bits_stored - 1) - 1)
    slope, intercept = dicom_number(ds, "RescaleSlope"), dicom_number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max


def _lut_descriptor(item, name: str) -> tuple[int, int, int]:
    """(entries, first mapped value, bits per entry) of a LUT Descriptor."""
    try:
        values = [int(v) for v in item["LUTDescriptor"].value]
    except Exception:
        raise BadImageError(f"cannot decode DICOM image: the {name} LUT Descriptor is not three numbers") from None
    if len(values) != 3:
        raise BadImageError(f"cannot decode DICOM image: the {name} LUT Descriptor has {len(values)} values, not 3")
    entries, first, bits = values
    if not 8 <= bits <= 16:
        raise BadImageError(f"cannot decode DICOM image: {name} LUT entries of {bits} bits are not supported")
    return entries or 65536, first, bits


def _lut(item, name: str, little_endian: bool) -> _Lut:
    entries, first, _ = _lut_descriptor(item, name)
    try:
        element = item["LUTData"]
        value = element.value
        if isinstance(value, (bytes, bytearray)):  # OW: 16-bit words in the data set's byte order
            table = np.frombuffer(value, ("<" if little_endian else ">") + "u2", count=len(value) // 2)
        else:
            table = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except Exception:
        raise BadImageError(f"cannot decode DICOM image: the {name} LUT Data is malformed") from None
    if table.ndim != 1 or len(table) < entries:
        raise BadImageError(f"cannot decode DICOM image: the {name} LUT has {table.size} entries; "
                            f"its descriptor says {entries}")
    return _Lut(first, table[:entries].astype(np.float64))


@dataclass
class _Rescale:
    slope: float
    intercept: float

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return arr.astype(np.float64) * self.slope + self.intercept


@dataclass
class _Lut:
    """A Modality or VOI lookup table: values below ``first`` map to entry 0, above the end to the last."""

    first: int
    table: np.ndarray  # float64

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        if np.issubdtype(arr.dtype, np.integer):
            index = arr.astype(np.int64) - self.first
        else:  # pydicom truncates a float input into its unsigned index
            index = np.floor(arr - self.first)
        return self.table[np.clip(index, 0, len(self.table) - 1).astype(np.intp)]


@dataclass
class _Window:
    """PS3.3 C.11.2.1.2 windowing (LINEAR, LINEAR_EXACT or SIGMOID) onto [y_min, y_max]."""

    center: float
    width: float
    function: str
    y_min: float
    y_max: float

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        arr = arr.astype(np.float64)
        y_range = self.y_max - self.y_min
        if self.function == "SIGMOID":
            with np.errstate(over="ignore"):
                return y_range / (1 + np.exp(-4 * (arr - self.center) / self.width)) + self.y_min
        center, width = self.center, self.width
        if self.function == "LINEAR":
            center, width = center - 0.5, width - 1
        with np.errstate(divide="ignore", invalid="ignore"):  # width 0 (LINEAR, 1): nothing lies between
            between = ((arr - center) / width + 0.5) * y_range + self.y_min
        return np.where(arr <= center - width / 2, self.y_min,
                        np.where(arr > center + width / 2, self.y_max, between))
