"""A compressed frame's own geometry, read from its codestream's markers before it is decoded.

A DICOM header says Rows × Columns, but a JPEG, JPEG-LS or JPEG 2000 decoder allocates and works
at the size its codestream says: a 4 KB file whose header says 64×64 can hold a fragment of
13000×13000. :func:`read` parses the markers only (no entropy-coded data is decoded) and
:func:`check_frame` refuses a codestream that does not match its header, or whose decode would
cost more than its size suggests (too many scans, too many tiles), so that every decoder runs
on a size already checked against the budget.

* JPEG (ITU T.81: baseline, extended, progressive, lossless; SOF0–3, SOF9–11) and JPEG-LS
  (T.87: SOF55): the first SOF gives precision, height, width and components; SOS markers are
  counted (a progressive JPEG repeats its whole-image work once per scan). Hierarchical JPEG
  (DHP, SOF5–7/13–15) and a height left to a DNL marker are refused.
* JPEG 2000 and HTJ2K (T.800 / T.814, a raw codestream or a JP2 file's ``jp2c`` box): the SIZ
  marker gives the image and tile grid, component count and precision.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..errors import BadImageError

MAX_SCANS = 100  # scans of one JPEG (a progressive one uses about 10): each may cover the whole image
MAX_TILES = 4096  # JPEG 2000 tiles of one frame (one tile, or 1024 x 1024 tiles, in practice)

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB, 0xF7}  # the frames decoders here may meet
_HIERARCHICAL = {0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE}  # SOF5-7, SOF13-15, DHP
_STANDALONE = {0x01, 0xD8, 0xD9, *range(0xD0, 0xD8)}  # TEM, SOI, EOI, RST0-7: no length
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]")  # past entropy-coded data: FF00 is a stuffed byte


@dataclass(frozen=True)
class Codestream:
    """What a codestream says of itself."""

    kind: str  # 'JPEG', 'JPEG-LS' or 'JPEG 2000'
    width: int
    height: int
    components: int
    precision: int  # bits per sample (the largest, for JPEG 2000)


def read(data: bytes) -> Codestream:
    """The geometry of a JPEG, JPEG-LS or JPEG 2000 codestream (raw or JP2), from its markers."""
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)[0]
    if data[:4] == b"\xff\x4f\xff\x51":
        return _j2k(data, 0)
    if data[4:8] == b"jP  ":
        return _j2k(data, _jp2_codestream(data))
    raise BadImageError("cannot decode DICOM image: the compressed frame is not a JPEG, JPEG-LS or JPEG 2000 codestream")


def check_frame(data: bytes, frame, syntax_name: str) -> Codestream:
    """The codestream of one DICOM frame agrees with the header's Rows, Columns, SamplesPerPixel
    and BitsAllocated (``frame``: a dicom_header.Frame, already checked against the budget)."""
    cs = read(data)
    what = f"the {cs.kind} codestream of this {syntax_name} frame"
    if (cs.width, cs.height) != (frame.columns, frame.rows):
        raise BadImageError(f"cannot decode DICOM image: {what} is {cs.width}x{cs.height} but the header says "
                            f"{frame.columns}x{frame.rows}")
    if cs.components != frame.samples:
        raise BadImageError(f"cannot decode DICOM image: {what} has {cs.components} components but the header "
                            f"says SamplesPerPixel {frame.samples}")
    if cs.precision > frame.bits_allocated:
        raise BadImageError(f"cannot decode DICOM image: {what} has {cs.precision}-bit samples but the header "
                            f"says BitsAllocated {frame.bits_allocated}")
    return cs


def jpeg_scans(data: bytes) -> int:
    """The number of scans of a stand-alone JPEG upload, refused above MAX_SCANS. Lenient about
    bytes between marker segments, as Pillow is: only the cost is checked here, Pillow decides
    the rest."""
    return _jpeg(data, lenient=True)[1]


def _jpeg(data: bytes, lenient: bool = False) -> tuple[Codestream, int]:
    """The first SOF and the number of scans, from the marker segments (entropy-coded data is
    skipped by a regular expression, in C, so a long scan costs no Python loop)."""
    at, sof, scans, n = 2, None, 0, len(data)
    while at + 4 <= n:
        if data[at] != 0xFF:
            if not lenient:
                raise BadImageError(f"cannot decode image: the JPEG has no marker at byte {at}")
            at = data.find(b"\xff", at)
            if at < 0:
                break
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            if marker == 0xD9:
                break
            at += 2
            continue
        length = struct.unpack_from(">H", data, at + 2)[0]
        if length < 2:
            raise BadImageError("cannot decode image: a JPEG marker segment has a length below 2")
        if marker in _HIERARCHICAL:
            raise BadImageError("cannot decode image: hierarchical JPEG is not supported")
        if marker in _SOF:
            if sof is not None:
                raise BadImageError("cannot decode image: the JPEG has more than one frame header")
            if length < 8 or at + 10 > n:
                raise BadImageError("cannot decode image: the JPEG frame header is cut short")
            precision, height, width, components = struct.unpack_from(">BHHB", data, at + 4)
            if height == 0:
                raise BadImageError("cannot decode image: a JPEG whose height is left to a DNL marker is not supported")
            sof = Codestream("JPEG-LS" if marker == 0xF7 else "JPEG", width, height, components, precision)
        at += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            scans += 1
            if scans > MAX_SCANS:
                raise BadImageError(f"cannot decode image: the JPEG has more than {MAX_SCANS} scans")
            found = _NEXT_MARKER.search(data, at)
            if found is None:
                break
            at = found.end() - 2
    if sof is None:
        raise BadImageError("cannot decode image: the JPEG has no frame header (SOF)")
    return sof, scans


def _j2k(data: bytes, at: int) -> Codestream:
    """SIZ (T.800 A.5.1), right after SOC: image and tile grid, components and their precision."""
    if data[at:at + 4] != b"\xff\x4f\xff\x51" or len(data) < at + 4 + 38:
        raise BadImageError("cannot decode image: the JPEG 2000 codestream has no SIZ marker")
    (lsiz, _rsiz, xsiz, ysiz, x0, y0, xt, yt, xt0, yt0, csiz) = struct.unpack_from(">HHIIIIIIIIH", data, at + 4)
    if lsiz != 38 + 3 * csiz or csiz < 1 or len(data) < at + 4 + lsiz:
        raise BadImageError("cannot decode image: the JPEG 2000 SIZ marker is malformed")
    if not (x0 < xsiz and y0 < ysiz and xt >= 1 and yt >= 1 and xt0 <= x0 and yt0 <= y0
            and xt0 + xt > x0 and yt0 + yt > y0):
        raise BadImageError("cannot decode image: the JPEG 2000 image or tile grid is malformed")
    tiles = -(-(xsiz - xt0) // xt) * -(-(ysiz - yt0) // yt)
    if tiles > MAX_TILES:
        raise BadImageError(f"cannot decode image: the JPEG 2000 codestream has {tiles} tiles, "
                            f"above the limit of {MAX_TILES}")
    precision = 0
    for c in range(csiz):
        ssiz, xr, yr = data[at + 42 + 3 * c:at + 45 + 3 * c]
        if xr < 1 or yr < 1:
            raise BadImageError("cannot decode image: a JPEG 2000 component has a subsampling of 0")
        precision = max(precision, (ssiz & 0x7F) + 1)
    return Codestream("JPEG 2000", xsiz - x0, ysiz - y0, csiz, precision)


def _jp2_codestream(data: bytes) -> int:
    """Where the codestream of a JP2 file starts: the contents of its ``jp2c`` box."""
    at = 0
    while at + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1 and at + 16 <= len(data):
            size, header = struct.unpack_from(">Q", data, at + 8)[0], 16
        if kind == b"jp2c":
            return at + header
        if size < header:  # 0: to the end of the file, and it is not the codestream
            break
        at += size
    raise BadImageError("cannot decode image: the JP2 file has no codestream box")
