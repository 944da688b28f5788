"""DICOM → [0, 1], bounded: the header walked, the geometry checked, frame 0 read band by band.

pydicom's ``dcmread`` + ``pixel_array`` would read every frame, and inflate a deflated data set
whole, before anything could be checked. Here, instead:

* the file meta is read by hand and the data set only up to its Pixel Data element (a deflated
  one is inflated only that far, and refused when its header is over _DICOM_HEADER_CAP);
* the geometry (dicom_header) is checked against the budget and against the pixel data's
  length, and the greyscale transforms (dicom_values) are validated, before any pixel;
* only frame 0 is decoded: native pixel data (inflated as it is read, for a deflated data set)
  as bands of rows that pydicom decodes one at a time, compressed pixel data as one frame.

The values are those of pydicom's LUT functions on the whole frame: modality transform, VOI
transform when there is a window, normalised by the frame's minimum and maximum, MONOCHROME1
inverted; colour (pydicom converts YBR to RGB) scaled by BitsStored. Parsed from memory: nothing
is executed and no external reference is followed.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadImageError
from .bands import Budget, band_rows, sink_for
from .dicom_header import Frame
from .dicom_values import GreyValues
from .inflate import Inflater

_DICOM_HEADER_CAP = 8 * 1024 * 1024  # inflated bytes allowed before a deflated data set's pixel data
_DICOM_FRAME_CAP = 256 * 1024 * 1024  # bytes of one DICOM frame, whatever max_pixels allows

_PIXEL_DATA = (0x7FE0, 0x0010)
_PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Columns",
                 "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


def decode(data: bytes, budget: Budget, target_size: int | None) -> np.ndarray:
    """DICOM bytes → float32 [H, W] or [H, W, 3] in [0, 1], frame 0 (see the module docstring)."""
    source = _DicomSource.open(data)
    frame = Frame.of(source.ds)
    budget.check_size("DICOM", frame.columns, frame.rows, frame.frames)
    _check_pixel_bytes(frame, source)
    grey = GreyValues.of(source.ds, frame) if frame.samples == 1 else None  # validated before any pixel
    budget.check_time("after the DICOM header")
    sink = sink_for(frame.rows, frame.columns, target_size)
    for band in source.bands(frame, budget):
        sink.add(band if grey is None else grey.apply(band))
    image = sink.result()
    if grey is None:  # RGB (pydicom converts YBR), scaled by the stored range
        return image / np.float32(2 ** frame.bits_stored - 1)
    out = _to_unit(image, sink.hi, sink.lo)
    return 1.0 - out if frame.photometric == "MONOCHROME1" else out


def _to_unit(img: np.ndarray, hi: float, lo: float) -> np.ndarray:
    span = hi - lo
    if span <= 0:
        return np.zeros_like(img, dtype=np.float32)
    return ((img - np.float32(lo)) / np.float32(span)).astype(np.float32)


def _check_pixel_bytes(frame: Frame, source: _DicomSource) -> None:
    """One frame within _DICOM_FRAME_CAP; native pixel data long enough for frame 0, and for a
    deflated data set no longer than its frames (more is inflation the geometry does not need)."""
    if frame.frame_bytes > _DICOM_FRAME_CAP:
        raise BadImageError(f"DICOM frame is {frame.frame_bytes} bytes, above the limit of {_DICOM_FRAME_CAP}")
    length = source.pixel_length
    if source.syntax.is_encapsulated:
        return  # compressed: pydicom finds frame 0's fragments
    if length == _UNDEFINED:
        raise BadImageError(f"cannot decode DICOM image: encapsulated pixel data in {source.syntax.name}")
    if length < frame.frame_bytes:
        raise BadImageError(f"cannot decode DICOM image: the pixel data is {length} bytes; "
                            f"one {frame.columns}x{frame.rows} frame needs {frame.frame_bytes}")
    needed = -(-frame.frames * frame.rows * frame.row_bits // 8)
    if source.deflated and length > needed + 1:  # + 1: the even-length padding byte
        raise BadImageError(f"DICOM pixel data is {length} bytes once inflated but {frame.frames} frame(s) of "
                            f"{frame.columns}x{frame.rows} need {needed}: refused as a decompression bomb")


@dataclass
class _DicomSource:
    """The header (no pixel data), the transfer syntax, and where the Pixel Data value starts."""

    data: bytes
    ds: Any  # pydicom Dataset, file_meta included
    syntax: Any  # pydicom UID
    pixel_vr: str | None  # None for implicit VR
    pixel_length: int  # _UNDEFINED for encapsulated data
    reader: Any  # .read(n) → the next n bytes of the Pixel Data value (inflated for a deflated data set)

    @classmethod
    def open(cls, data: bytes) -> _DicomSource:
        import pydicom
        from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

        meta, meta_end = _read_file_meta(data)
        syntax = UID(str(meta.get("TransferSyntaxUID", "")))
        if not syntax:
            raise BadImageError("cannot decode DICOM image: the file meta has no Transfer Syntax UID")
        if syntax == DeflatedExplicitVRLittleEndian:
            return cls._open_deflated(data, meta, meta_end, syntax)
        fp = io.BytesIO(data)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)  # leaves fp at the Pixel Data element
        at = fp.tell()
        vr, length, header = _pixel_element(data[at:at + 12], syntax)
        return cls(data, ds, syntax, vr, length, _Bytes(memoryview(data)[at + header:]))

    @classmethod
    def _open_deflated(cls, data: bytes, meta, meta_end: int, syntax) -> _DicomSource:
        """Inflate the header only, never the whole data set as pydicom would: the pixel data is
        inflated later, band by band, and only as far as frame 0 needs."""
        from pydicom.uid import ExplicitVRLittleEndian

        stream = Inflater([memoryview(data)[meta_end:]], -zlib.MAX_WBITS)
        ds, head, at = _inflate_header(stream)
        ds.file_meta = meta
        vr, length, header = _pixel_element(head[at:at + 12], ExplicitVRLittleEndian)
        if length == _UNDEFINED:
            raise BadImageError("cannot decode DICOM image: deflated data with encapsulated pixel data")
        stream.push_back(head[at + header:])
        return cls(data, ds, syntax, vr, length, stream)

    @property
    def deflated(self) -> bool:
        from pydicom.uid import DeflatedExplicitVRLittleEndian

        return self.syntax == DeflatedExplicitVRLittleEndian

    def bands(self, frame: Frame, budget: Budget) -> Iterator[np.ndarray]:
        """Frame 0 as native-resolution bands of rows, in pydicom's values (sign, unused bits, YBR → RGB)."""
        if self.syntax.is_encapsulated:
            yield from self._encapsulated_bands(frame, budget)
        else:
            yield from self._native_bands(frame, budget)

    def _encapsulated_bands(self, frame: Frame, budget: Budget) -> Iterator[np.ndarray]:
        from pydicom.pixels.utils import pixel_array

        # a compressed frame is decoded whole (its size is bounded by the checks above), and only frame 0
        arr = pixel_array(io.BytesIO(self.data), index=0)
        budget.check_time("after decompressing the DICOM frame")
        rows = band_rows(frame.columns, frame.samples)
        for y in range(0, frame.rows, rows):
            yield arr[y:y + rows]

    def _native_bands(self, frame: Frame, budget: Budget) -> Iterator[np.ndarray]:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.pixels.utils import pixel_array
        from pydicom.uid import ExplicitVRLittleEndian

        band = Dataset()  # one band of rows as a data set of its own, so that pydicom decodes it
        band.file_meta = FileMetaDataset()
        band.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if self.deflated else self.syntax
        for keyword in _PIXEL_MODULE:
            if keyword in self.ds:
                setattr(band, keyword, self.ds[keyword].value)
        vr = self.pixel_vr or ("OW" if frame.bits_allocated > 8 else "OB")
        rows = frame.rows if frame.planar else band_rows(frame.columns, frame.samples)  # planar: R, G, B planes
        if frame.bits_allocated == 1:
            rows = -(-rows // 8) * 8  # whole bytes per band
        for y in range(0, frame.rows, rows):
            n = min(rows, frame.rows - y)
            size = -(-n * frame.row_bits // 8)
            raw = self.reader.read(size)
            if len(raw) < size:
                raise BadImageError(f"cannot decode DICOM image: the pixel data ends at row {y} of {frame.rows}")
            band.Rows = n
            band.add_new(0x7FE00010, vr, raw)
            yield pixel_array(band)
            budget.check_time(f"at row {y + n} of {frame.rows}")


class _Bytes:
    """Bytes already in memory, read in order (no copy until a band is taken): the reader of
    pixel data that is not deflated."""

    def __init__(self, view: memoryview):
        self._view, self._at = view, 0

    def read(self, n: int) -> bytes:
        out = self._view[self._at:self._at + n]
        self._at += len(out)
        return bytes(out)


def _inflate_header(stream: Inflater):
    """(header data set, inflated bytes, offset of the Pixel Data element), inflating 64 KB, then
    4 times more each time the header goes on, up to _DICOM_HEADER_CAP: only a little pixel data
    is inflated before the geometry is checked, and a header bigger than the cap is refused."""
    from pydicom.filereader import read_dataset

    head, size = b"", 64 * 1024
    while True:
        head += stream.read(size - len(head))
        more = len(head) == size  # the stream may go on
        fp = io.BytesIO(head)
        try:
            ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixel_data)
            if fp.tell() + 12 <= len(head) or not more:  # stopped at the pixel data, or the data set ends
                return ds, head, fp.tell()
        except Exception:  # cut off inside an element
            if not more:
                raise
        if size >= _DICOM_HEADER_CAP:
            raise BadImageError(f"DICOM header is over {_DICOM_HEADER_CAP >> 20} MB once inflated: "
                                "refused as a decompression bomb")
        size = min(4 * size, _DICOM_HEADER_CAP)


def _at_pixel_data(tag, vr, length) -> bool:
    """read_dataset's stop_when: any of the pixel data elements (float, double float or integer)."""
    return tag >> 16 == 0x7FE0 and tag & 0xFFFF in (0x0008, 0x0009, 0x0010)


def _read_file_meta(data: bytes):
    """The group 0002 elements (explicit VR little endian after the preamble and 'DICM') and
    where they end; read here because pydicom's dcmread would inflate a deflated data set whole."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    at = 132
    while at + 8 <= len(data) and struct.unpack("<H", data[at:at + 2])[0] == 0x0002:
        if data[at + 4:at + 6] in _LONG_VRS:
            at += 12 + struct.unpack("<I", data[at + 8:at + 12])[0]
        else:
            at += 8 + struct.unpack("<H", data[at + 6:at + 8])[0]
    meta = read_dataset(io.BytesIO(data[132:at]), is_implicit_VR=False, is_little_endian=True)
    return FileMetaDataset(meta), at


def _pixel_element(header: bytes, syntax) -> tuple[str | None, int, int]:
    """(VR, value length, header length) of the element that should be (7FE0,0010) Pixel Data."""
    order = "<" if syntax.is_little_endian else ">"
    if len(header) < 8:
        raise BadImageError("cannot decode DICOM image: the file has no pixel data")
    tag = struct.unpack(order + "HH", header[:4])
    if tag != _PIXEL_DATA:
        what = "float pixel data" if tag[0] == 0x7FE0 else f"element ({tag[0]:04X},{tag[1]:04X})"
        raise BadImageError(f"cannot decode DICOM image: {what} where Pixel Data was expected")
    if syntax.is_implicit_VR:
        return None, struct.unpack(order + "I", header[4:8])[0], 8
    if len(header) < 12:
        raise BadImageError("cannot decode DICOM image: the Pixel Data element is cut short")
    return header[4:6].decode("ascii", "replace"), struct.unpack(order + "I", header[8:12])[0], 12
