"""One RLE Lossless frame (DICOM PS3.5 annex G) decoded with its output bounded by its geometry.

pydicom's RLE decoder expands each PackBits segment as far as its runs say and only then
compares the result with Rows × Columns: two bytes of input may ask for 128 bytes of output, so a
15 MB file expanded to 960 MB. Here the 64-byte RLE header is checked first (segment count =
samples × bytes per sample, offsets ascending within the fragment), and each segment is decoded
into exactly Rows × Columns bytes: a segment whose runs go on past its frame is
refused as a bomb. Nothing is ever held beyond one frame of bytes (and one run), and the runs are
decoded in C (Pillow's PackBits decoder, the TIFF one), not one Python step a run as pydicom does.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import BadImageError
from .bands import Budget

_ONE_RUN = 129  # decoded bytes a segment may hold past its frame: its last run's overshoot, padding


def decode_frame(fragment: bytes, rows: int, columns: int, samples: int, bits_allocated: int,
                 budget: Budget) -> bytes:
    """The frame as native pixel data: little endian, samples interleaved (PlanarConfiguration 0)."""
    if bits_allocated % 8:
        raise BadImageError(f"cannot decode DICOM image: RLE with BitsAllocated {bits_allocated} is not supported")
    width = bits_allocated // 8
    if len(fragment) < 64:
        raise BadImageError("cannot decode DICOM image: the RLE frame is shorter than its 64-byte header")
    header = struct.unpack_from("<16I", fragment)
    count, offsets = header[0], list(header[1:1 + header[0]]) if 0 < header[0] <= 15 else []
    if count != samples * width:
        raise BadImageError(f"cannot decode DICOM image: the RLE frame has {count} segments; "
                            f"{samples} sample(s) of {bits_allocated} bits need {samples * width}")
    ends = offsets[1:] + [len(fragment)]
    if offsets[0] != 64 or any(a > b for a, b in zip(offsets, ends)):
        raise BadImageError("cannot decode DICOM image: the RLE segment offsets are out of order or out of the frame")
    plane = rows * columns
    out = np.empty((plane, samples, width), np.uint8)
    for k, (a, b) in enumerate(zip(offsets, ends)):
        sample, significance = divmod(k, width)  # segments: each sample's most significant byte first
        out[:, sample, width - 1 - significance] = np.frombuffer(_segment(fragment, a, b, plane, k), np.uint8)
        budget.check_time(f"after RLE segment {k + 1}")
    return out.tobytes()


def _segment(src: bytes, at: int, end: int, size: int, index: int) -> bytes:
    """PackBits-decode src[at:end] into exactly ``size`` bytes, by Pillow's PackBits decoder (C; its
    output is the image it is given, never more): once into ``size`` bytes, which the segment must
    fill (else it is short), and once into one run more, which it must not fill (else its runs go
    on past the frame: a bomb). Both decodes are bounded by the frame, whatever the runs say."""
    from PIL import Image

    segment = src[at:end]
    try:
        out = Image.frombytes("L", (size, 1), segment, "packbits", "L").tobytes()
    except ValueError:  # 'not enough image data': the runs end before the frame does
        raise BadImageError(f"cannot decode DICOM image: RLE segment {index + 1} decodes to fewer than the "
                            f"{size} bytes of its frame") from None
    try:
        Image.frombytes("L", (size + _ONE_RUN, 1), segment, "packbits", "L")
    except ValueError:
        return out  # ends within one run of the frame's end (padding): as pydicom, the frame is kept
    raise BadImageError(f"cannot decode DICOM image: RLE segment {index + 1} holds more than the {size} bytes "
                        "of its frame: refused as a decompression bomb")
