"""A DICOM data set's elements walked (never parsed) up to its pixel data, counted and timed.

pydicom builds an object for every element it reads, about 8 µs each: a header of two million
empty elements (16 MB, or 1.5 MB deflated) took 16 s to parse. :func:`walk` steps over element
headers only, into sequences and their items (which also count), stops at the top-level Pixel
Data, and refuses a header of more than ``MAX_ELEMENTS`` elements, or one still being walked at
the decode deadline, as too costly (422). It returns where the pixel data starts and the byte
ranges of the top-level group 0028 elements (the Image Pixel module, rescale, window and LUTs:
all the decoder reads), so that pydicom parses those few elements and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import BadImageError, ImageTooCostlyError
from .bands import Budget

MAX_ELEMENTS = 100_000  # elements and items of one header (a CT slice has ~300; enhanced multi-frame ~50 a frame)
MAX_DEPTH = 16  # sequences nested in sequences
_TIME_EVERY = 4096  # elements between two deadline checks

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_PIXEL_ELEMENTS = (0x0008, 0x0009, 0x0010)  # float, double float and integer pixel data of group 7FE0


class Short(Exception):
    """The bytes end inside an element: a deflated stream should be inflated further."""


@dataclass
class Header:
    """Where the top-level pixel data element starts (None: the data set has none) and the ranges
    of the top-level group 0028 elements."""

    pixel_at: int | None
    image_ranges: list[tuple[int, int]] = field(default_factory=list)
    elements: int = 0

    def image_elements(self, data) -> bytes:
        return b"".join(bytes(data[a:b]) for a, b in self.image_ranges)


def walk(data, start: int, *, implicit: bool, little: bool, budget: Budget, complete: bool = True) -> Header:
    """Walk the data set in ``data[start:]``. ``complete``: ``data`` is the whole data set, so
    bytes ending inside an element are a malformed file (400); else :class:`Short` is raised."""
    walker = _Walker(data, implicit, "<" if little else ">", budget)
    try:
        return walker.dataset(start)
    except Short:
        if complete:
            raise BadImageError("cannot decode DICOM image: the header ends inside an element") from None
        raise


class _Walker:
    def __init__(self, data, implicit: bool, order: str, budget: Budget):
        self.data, self.implicit, self.budget = data, implicit, budget
        self.tag = struct.Struct(order + "HH")
        self.u16, self.u32 = struct.Struct(order + "H"), struct.Struct(order + "I")
        self.implicit_header = struct.Struct(order + "HHI")
        self.count = 0

    def dataset(self, start: int) -> Header:
        """The top level: stops at the pixel data, records group 0028."""
        header, at, end = Header(None), start, len(self.data)
        while at < end:
            if at + 8 > end:
                raise Short
            group, elem = self.tag.unpack_from(self.data, at)
            if group == 0x7FE0 and elem in _PIXEL_ELEMENTS:
                header.pixel_at = at
                break
            nxt = self.element(at, depth=0, implicit=self.implicit)
            if group == 0x0028:
                header.image_ranges.append((at, nxt))
            at = nxt
        header.elements = self.count
        return header

    def tick(self) -> None:
        """One more element or item: refused past MAX_ELEMENTS; the deadline checked now and then."""
        self.count += 1
        if self.count > MAX_ELEMENTS:
            raise ImageTooCostlyError(f"DICOM header has more than {MAX_ELEMENTS} elements and items: "
                                      "too costly to decode")
        if self.count % _TIME_EVERY == 0:
            self.budget.check_time(f"at element {self.count} of the DICOM header")

    def element(self, at: int, depth: int, implicit: bool) -> int:
        """Step over the element at ``at`` (into it, when it is a sequence); where the next one starts."""
        data = self.data
        self.tick()
        group, _ = self.tag.unpack_from(data, at)
        if group == 0xFFFE:
            raise BadImageError(f"cannot decode DICOM image: an item tag at byte {at} outside a sequence")
        if implicit:
            vr, (length,), value = None, self.u32.unpack_from(data, at + 4), at + 8
        else:
            vr = bytes(data[at + 4:at + 6])
            if vr in _LONG_VRS:
                if at + 12 > len(data):
                    raise Short
                vr_length = self.u32.unpack_from(data, at + 8)[0]
                length, value = vr_length, at + 12
            else:
                length, value = self.u16.unpack_from(data, at + 6)[0], at + 8
        if length == _UNDEFINED:  # a sequence (UN of undefined length holds implicit VR little endian)
            return self.sequence(value, None, depth + 1, implicit or vr == b"UN")
        end = value + length
        if end > len(data):
            raise Short
        if vr == b"SQ" or (vr is None and length >= 8 and self.tag.unpack_from(data, value) == (0xFFFE, _ITEM)):
            self.sequence(value, end, depth + 1, implicit)
        return end

    def sequence(self, at: int, end: int | None, depth: int, implicit: bool) -> int:
        """Step over the items of a sequence (``end`` None: undefined length, up to its delimiter)."""
        if depth > MAX_DEPTH:
            raise BadImageError(f"cannot decode DICOM image: sequences nested more than {MAX_DEPTH} deep")
        data, limit = self.data, len(self.data) if end is None else end
        while end is None or at < end:
            if at + 8 > limit:
                if end is not None:
                    raise BadImageError("cannot decode DICOM image: a sequence item runs past its sequence")
                raise Short
            group, elem, length = self.implicit_header.unpack_from(data, at)
            if (group, elem) == (0xFFFE, _SEQUENCE_END) and end is None:
                return at + 8
            if (group, elem) != (0xFFFE, _ITEM):
                raise BadImageError(f"cannot decode DICOM image: a sequence holds ({group:04X},{elem:04X}), not an item")
            self.tick()
            at += 8
            if length == _UNDEFINED:
                at = self.item(at, None, depth, implicit)
            else:
                if at + length > limit:
                    raise Short if end is None else BadImageError(
                        "cannot decode DICOM image: a sequence item runs past its sequence")
                self.item(at, at + length, depth, implicit)
                at += length
        return at

    def item(self, at: int, end: int | None, depth: int, implicit: bool) -> int:
        """Step over the elements of one item (``end`` None: up to its delimiter); where it ends."""
        data, limit = self.data, len(self.data) if end is None else end
        while end is None or at < end:
            if at + 8 > limit:
                raise Short if end is None else BadImageError("cannot decode DICOM image: an item element is cut short")
            if self.tag.unpack_from(data, at) == (0xFFFE, _ITEM_END):
                if end is None:
                    return at + 8
                at += 8  # a delimiter in a defined-length item: tolerated, as pydicom does
                continue
            at = self.element(at, depth, implicit)
            if at > limit:
                raise BadImageError("cannot decode DICOM image: an element runs past its item")
        return at
