"""DICOM → [0, 1], bounded: the header walked, the geometry checked, frame 0 read band by band.

pydicom's ``dcmread`` + ``pixel_array`` would read every frame, and inflate a deflated data set
whole, before anything could be checked. Here, instead:

* the file meta is read by hand and the data set walked (dicom_elements: elements counted, the
  deadline checked) up to its Pixel Data element, and pydicom parses only the group 0028
  elements the decoder reads; a deflated data set is inflated only that far, and refused when its
  header is over _DICOM_HEADER_CAP;
* the geometry (dicom_header) is checked against the budget and against the pixel data's
  length, and the greyscale transforms (dicom_values) are validated, before any pixel;
* only frame 0 is decoded: native pixel data (inflated as it is read, for a deflated data set)
  as bands of rows that pydicom decodes one at a time. Compressed: frame 0's fragments are found
  by walking the items (at most _MAX_FRAGMENTS); RLE is decoded here with each segment bounded by
  its frame (rle), then read as native bands; a JPEG, JPEG-LS or JPEG 2000 codestream must say the
  header's geometry (codestream) before pydicom decodes it as one frame.

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

from ..errors import BadImageError, ImageTooCostlyError
from . import codestream, dicom_elements, rle
from .bands import Budget, band_rows, sink_for
from .dicom_header import Frame, check_bounded
from .dicom_values import GreyValues
from .inflate import Inflater

_DICOM_HEADER_CAP = 8 * 1024 * 1024  # inflated bytes allowed before a deflated data set's pixel data
_DICOM_FRAME_CAP = 256 * 1024 * 1024  # bytes of one DICOM frame, whatever max_pixels allows
_MAX_META_ELEMENTS = 256  # group 0002 holds about 8
_MAX_FRAGMENTS = 10_000  # items of encapsulated pixel data walked to find frame 0
_RLE = "1.2.840.10008.1.2.5"

_PIXEL_DATA = (0x7FE0, 0x0010)
_PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Columns",
                 "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


def decode(data: bytes, budget: Budget, target_size: int | None) -> np.ndarray:
    """DICOM bytes → float32 [H, W] or [H, W, 3] in [0, 1], frame 0 (see the module docstring)."""
    source = _DicomSource.open(data, budget)
    frame = Frame.of(source.ds)
    budget.check_size("DICOM", frame.columns, frame.rows, frame.frames)
    _check_pixel_bytes(frame, source)
    if source.syntax.is_encapsulated:
        source.find_frame_zero(frame)
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


def check_header(data: bytes, budget: Budget, any_syntax: bool = False) -> None:
    """Walk a DICOM data set's header within the decoder's bounds and parse nothing: the file meta,
    then the elements counted (dicom_elements), a deflated data set inflated only as far as
    _DICOM_HEADER_CAP. A reader that parses the whole header afterwards (pydicom, for the DICOM doors,
    which need every routing attribute) then works on a bounded header: a flood is refused here.
    ``any_syntax``: a transfer syntax the decoder refuses is walked as explicit VR little endian (as
    pydicom reads it) rather than refused, for a caller that reports the syntax itself."""
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta, meta_end = _read_file_meta(data)
    syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    if not syntax:
        raise BadImageError("cannot decode DICOM image: the file meta has no Transfer Syntax UID")
    try:
        check_bounded(syntax)
    except BadImageError:
        if not any_syntax:
            raise
        syntax = ExplicitVRLittleEndian
    if syntax == DeflatedExplicitVRLittleEndian:
        _inflate_header(Inflater([memoryview(data)[meta_end:]], -zlib.MAX_WBITS), budget)
        return
    if syntax == ExplicitVRLittleEndian and not data[meta_end + 4:meta_end + 6].isalpha():
        syntax = ImplicitVRLittleEndian  # as _DicomSource.open reads it
    dicom_elements.walk(data, meta_end, implicit=syntax.is_implicit_VR, little=syntax.is_little_endian, budget=budget)


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
    value_at: int  # where the Pixel Data value starts in ``data`` (-1: deflated)
    frame_zero: bytes = b""  # compressed: frame 0's fragments, joined (find_frame_zero)

    @classmethod
    def open(cls, data: bytes, budget: Budget) -> _DicomSource:
        from pydicom.filereader import read_dataset
        from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        meta, meta_end = _read_file_meta(data)
        syntax = UID(str(meta.get("TransferSyntaxUID", "")))
        if not syntax:
            raise BadImageError("cannot decode DICOM image: the file meta has no Transfer Syntax UID")
        check_bounded(syntax)  # before the walk: an unknown syntax's encoding is unknown too
        if syntax == DeflatedExplicitVRLittleEndian:
            return cls._open_deflated(data, meta, meta_end, syntax, budget)
        if syntax == ExplicitVRLittleEndian and not data[meta_end + 4:meta_end + 6].isalpha():
            syntax = ImplicitVRLittleEndian  # written implicit though the meta says explicit: read as pydicom does
        header = dicom_elements.walk(data, meta_end, implicit=syntax.is_implicit_VR, little=syntax.is_little_endian,
                                     budget=budget)
        ds = read_dataset(io.BytesIO(header.image_elements(data)), syntax.is_implicit_VR, syntax.is_little_endian)
        ds.file_meta = meta
        at = len(data) if header.pixel_at is None else header.pixel_at
        vr, length, size = _pixel_element(data[at:at + 12], syntax)
        return cls(data, ds, syntax, vr, length, _Bytes(memoryview(data)[at + size:]), at + size)

    @classmethod
    def _open_deflated(cls, data: bytes, meta, meta_end: int, syntax, budget: Budget) -> _DicomSource:
        """Inflate the header only, never the whole data set as pydicom would: the pixel data is
        inflated later, band by band, and only as far as frame 0 needs."""
        from pydicom.filereader import read_dataset
        from pydicom.uid import ExplicitVRLittleEndian

        stream = Inflater([memoryview(data)[meta_end:]], -zlib.MAX_WBITS)
        header, head = _inflate_header(stream, budget)
        ds = read_dataset(io.BytesIO(header.image_elements(head)), is_implicit_VR=False, is_little_endian=True)
        ds.file_meta = meta
        at = len(head) if header.pixel_at is None else header.pixel_at
        vr, length, size = _pixel_element(head[at:at + 12], ExplicitVRLittleEndian)
        if length == _UNDEFINED:
            raise BadImageError("cannot decode DICOM image: deflated data with encapsulated pixel data")
        stream.push_back(head[at + size:])
        return cls(data, ds, syntax, vr, length, stream, -1)

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

    def find_frame_zero(self, frame: Frame) -> None:
        """Frame 0's bytes, checked before anything decodes them: a codestream must say the
        header's geometry; RLE's segment table must fit the frame (its runs are bounded as decoded)."""
        self.frame_zero = _frame_zero(self.data, self.value_at, frame.frames, self.syntax == _RLE)
        if self.syntax != _RLE:
            codestream.check_frame(self.frame_zero, frame, self.syntax.name)

    def _encapsulated_bands(self, frame: Frame, budget: Budget) -> Iterator[np.ndarray]:
        from pydicom.encaps import encapsulate
        from pydicom.pixels.utils import pixel_array
        from pydicom.uid import ExplicitVRLittleEndian

        if self.syntax == _RLE:  # decoded here, bounded; then read as native little endian, interleaved
            native = rle.decode_frame(self.frame_zero, frame.rows, frame.columns, frame.samples,
                                      frame.bits_allocated, budget)
            budget.check_time("after decompressing the DICOM frame")
            yield from self._native_bands(frame, budget, _Bytes(memoryview(native)), ExplicitVRLittleEndian, 0)
            return
        one = _pixel_module(self.ds, self.syntax)  # frame 0 alone, its geometry checked (find_frame_zero)
        one.Rows, one.NumberOfFrames = frame.rows, 1
        one.PixelData = encapsulate([self.frame_zero])
        one["PixelData"].VR, one["PixelData"].is_undefined_length = "OB", True
        arr = pixel_array(one)
        budget.check_time("after decompressing the DICOM frame")
        rows = band_rows(frame.columns, frame.samples)
        for y in range(0, frame.rows, rows):
            yield arr[y:y + rows]

    def _native_bands(self, frame: Frame, budget: Budget, reader=None, syntax=None,
                      planar: int | None = None) -> Iterator[np.ndarray]:
        from pydicom.pixels.utils import pixel_array
        from pydicom.uid import ExplicitVRLittleEndian

        reader = reader or self.reader
        # one band of rows as a data set of its own, so that pydicom decodes it
        band = _pixel_module(self.ds, syntax or (ExplicitVRLittleEndian if self.deflated else self.syntax))
        planar = frame.planar if planar is None else planar
        if frame.samples > 1:
            band.PlanarConfiguration = planar
        vr = (self.pixel_vr if syntax is None else None) or ("OW" if frame.bits_allocated > 8 else "OB")
        rows = frame.rows if planar else band_rows(frame.columns, frame.samples)  # planar: R, G, B planes
        if frame.bits_allocated == 1:
            rows = -(-rows // 8) * 8  # whole bytes per band
        for y in range(0, frame.rows, rows):
            n = min(rows, frame.rows - y)
            size = -(-n * frame.row_bits // 8)
            raw = reader.read(size)
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


def _inflate_header(stream: Inflater, budget: Budget):
    """(walked header, inflated bytes), inflating 64 KB, then 4 times more each time the header
    goes on, up to _DICOM_HEADER_CAP: only a little pixel data is inflated before the geometry is
    checked, and a header bigger than the cap is refused. Each try is a walk (dicom_elements), never
    a parse, so a flood of elements is refused at MAX_ELEMENTS whatever it inflates to."""
    head, size = b"", 64 * 1024
    while True:
        head += stream.read(size - len(head))
        more = len(head) == size  # the stream may go on
        try:
            header = dicom_elements.walk(head, 0, implicit=False, little=True, budget=budget, complete=not more)
            if header.pixel_at is None or header.pixel_at + 12 <= len(head) or not more:
                return header, head
        except dicom_elements.Short:  # cut off inside an element
            pass
        if size >= _DICOM_HEADER_CAP:
            raise BadImageError(f"DICOM header is over {_DICOM_HEADER_CAP >> 20} MB once inflated: "
                                "refused as a decompression bomb")
        size = min(4 * size, _DICOM_HEADER_CAP)


def _pixel_module(ds, syntax):
    """A data set of the Image Pixel elements of ``ds`` alone (no pixel data yet), for pydicom to decode."""
    from pydicom.dataset import Dataset, FileMetaDataset

    one = Dataset()
    one.file_meta = FileMetaDataset()
    one.file_meta.TransferSyntaxUID = syntax
    for keyword in _PIXEL_MODULE:
        if keyword in ds:
            setattr(one, keyword, ds[keyword].value)
    return one


def _frame_zero(data: bytes, at: int, frames: int, one_a_frame: bool) -> bytes:
    """Frame 0 of encapsulated pixel data (its value starting at ``at``): the fragments up to the
    second Basic Offset Table entry, or with no table, every fragment of a single frame, else those
    up to the next one that starts a codestream (one fragment a frame for RLE). At most
    _MAX_FRAGMENTS items are walked."""
    items = struct.Struct("<HHI")
    if at + 8 > len(data) or items.unpack_from(data, at)[:2] != (0xFFFE, 0xE000):
        raise BadImageError("cannot decode DICOM image: the encapsulated pixel data has no offset table item")
    length = items.unpack_from(data, at)[2]
    if length % 4 or at + 8 + length > len(data):
        raise BadImageError("cannot decode DICOM image: the basic offset table is malformed")
    table = struct.unpack_from(f"<{length // 4}I", data, at + 8)
    at = first = at + 8 + length
    end_of_zero = table[1] if frames > 1 and len(table) > 1 else None
    fragments: list[bytes] = []
    while True:
        if at + 8 > len(data):
            if fragments:
                break  # no sequence delimiter: the data ends after the last fragment
            raise BadImageError("cannot decode DICOM image: the encapsulated pixel data has no fragment")
        group, elem, length = items.unpack_from(data, at)
        if (group, elem) == (0xFFFE, 0xE0DD) or (end_of_zero is not None and at - first >= end_of_zero):
            break
        if (group, elem) != (0xFFFE, 0xE000) or length == _UNDEFINED or at + 8 + length > len(data):
            raise BadImageError("cannot decode DICOM image: a pixel data fragment is malformed or cut short")
        fragment = data[at + 8:at + 8 + length]
        if frames > 1 and end_of_zero is None and fragments and (
                fragment[:2] == b"\xff\xd8" or fragment[:2] == b"\xff\x4f" or fragment[4:8] == b"jP  "):
            break  # the next frame's codestream
        fragments.append(fragment)
        if len(fragments) > _MAX_FRAGMENTS:
            raise ImageTooCostlyError(f"DICOM frame 0 has more than {_MAX_FRAGMENTS} fragments: too costly to decode")
        at += 8 + length
        if frames > 1 and end_of_zero is None and one_a_frame:
            break
    if not fragments:
        raise BadImageError("cannot decode DICOM image: the encapsulated pixel data has no fragment for frame 0")
    return b"".join(fragments)


def _read_file_meta(data: bytes):
    """The group 0002 elements (explicit VR little endian after the preamble and 'DICM') and
    where they end; read here because pydicom's dcmread would inflate a deflated data set whole."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    at, count = 132, 0
    while at + 8 <= len(data) and struct.unpack("<H", data[at:at + 2])[0] == 0x0002:
        count += 1
        if count > _MAX_META_ELEMENTS:
            raise ImageTooCostlyError(f"DICOM file meta has more than {_MAX_META_ELEMENTS} elements: "
                                      "too costly to decode")
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
