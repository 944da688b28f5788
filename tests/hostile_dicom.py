"""Hostile DICOM files for the tests (issue 24 items 1 and 6), built here with pydicom, Pillow and
struct: small files whose codestream, RLE segments or header would cost far more than their
geometry allows. Nothing is downloaded; each builder runs in milliseconds."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGBaseline8Bit, RLELossless)


def dicom(rows, cols, *, syntax=ExplicitVRLittleEndian, bits=8, stored=None, samples=1, photometric="MONOCHROME2",
          signed=False, frames=None, **attrs) -> FileDataset:
    """A DICOM data set of this geometry (no pixel data yet); its instance UID is fixed, so that a test may
    patch a value's bytes knowing they occur once."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.2.1125.7")
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    stored = stored or bits
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, int(signed)
    if frames is not None:
        ds.NumberOfFrames = frames
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def save(ds) -> bytes:
    fp = io.BytesIO()
    pydicom.dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


def encapsulated(ds, frames: list[bytes]) -> bytes:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return save(ds)


def jpeg_bytes(array: np.ndarray, **save_kw) -> bytes:
    fp = io.BytesIO()
    Image.fromarray(array).save(fp, format="JPEG", **save_kw)
    return fp.getvalue()


def j2k_bytes(array: np.ndarray) -> bytes:
    fp = io.BytesIO()
    Image.fromarray(array).save(fp, format="JPEG2000", no_jp2=True, irreversible=False)
    return fp.getvalue()


def ramp(rows, cols, samples=1) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    grey = ((x * 3 + y * 5) % 256).astype(np.uint8)
    return grey if samples == 1 else np.stack([grey, 255 - grey, grey // 2], -1)


def jpeg_dicom(rows=64, cols=64, samples=1, **save_kw) -> bytes:
    """An honest JPEG Baseline DICOM."""
    photometric = "MONOCHROME2" if samples == 1 else "YBR_FULL_422"
    ds = dicom(rows, cols, syntax=JPEGBaseline8Bit, samples=samples, photometric=photometric)
    return encapsulated(ds, [jpeg_bytes(ramp(rows, cols, samples), **save_kw)])


def j2k_dicom(rows=64, cols=64, samples=1) -> bytes:
    """An honest JPEG 2000 Lossless DICOM."""
    ds = dicom(rows, cols, syntax=JPEG2000Lossless, samples=samples,
               photometric="MONOCHROME2" if samples == 1 else "RGB")
    return encapsulated(ds, [j2k_bytes(ramp(rows, cols, samples))])


def _patch_sof(jpeg: bytes, width: int, height: int) -> bytes:
    at = jpeg.index(b"\xff\xc0")
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def _patch_siz(j2k: bytes, width: int, height: int) -> bytes:
    at = j2k.index(b"\xff\x51")  # SIZ: marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, ...
    return j2k[:at + 6] + struct.pack(">IIIIII", width, height, 0, 0, width, height) + j2k[at + 30:]


def jpeg_fragment_bomb(side=13000) -> bytes:
    """The header says 64x64; the JPEG fragment's SOF says side x side (a few KB)."""
    ds = dicom(64, 64, syntax=JPEGBaseline8Bit)
    return encapsulated(ds, [_patch_sof(jpeg_bytes(ramp(64, 64)), side, side)])


def j2k_fragment_bomb(side=13000) -> bytes:
    """The header says 64x64; the JPEG 2000 fragment's SIZ says side x side (a few KB)."""
    ds = dicom(64, 64, syntax=JPEG2000Lossless)
    return encapsulated(ds, [_patch_siz(j2k_bytes(ramp(64, 64)), side, side)])


def rle_bomb(rows=64, cols=64, megabytes=15) -> bytes:
    """RLE Lossless, 16-bit: two segments of replicate runs (2 bytes -> 128 bytes each), `megabytes`
    of them, so the segments expand to 64 x that, far past the rows x cols bytes each should hold."""
    runs = b"\x81\x07" * (megabytes * 2**20 // 4)  # 0x81: repeat the next byte 128 times
    header = struct.pack("<16I", 2, 64, 64 + len(runs), *([0] * 13))
    ds = dicom(rows, cols, syntax=RLELossless, bits=16)
    return encapsulated(ds, [header + runs + runs])


def _flood_elements(count: int) -> bytes:
    """`count` empty private LO elements (8 bytes each, explicit VR little endian), tags ascending."""
    out = bytearray()
    group = 0x0009
    while count > 0:
        n = min(count, 0xFF00)
        out += b"".join(struct.pack("<HH2sH", group, 0x0100 + e, b"LO", 0) for e in range(n))
        count -= n
        group += 2
    return bytes(out)


def _meta_bytes(meta) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _dataset_bytes(ds) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def header_flood(count=2_000_000, *, deflated=False) -> bytes:
    """A 64x64 8-bit image whose header also holds `count` empty elements (16 MB for 2 million;
    deflated, about 70 KB)."""
    ds = dicom(64, 64, syntax=DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian)
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 64 * 64) + bytes(range(256)) * 16
    # group 0028 (the image pixel module) before the flood, the flood in groups 0009.., pixels last
    body = _dataset_bytes(ds) + _flood_elements(count) + pixels
    if deflated:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = c.compress(body) + c.flush()
    return b"\0" * 128 + b"DICM" + _meta_bytes(ds.file_meta) + body


def sequence_flood(count=1_000_000) -> bytes:
    """The flood hidden in one sequence item of undefined length (a private SQ)."""
    ds = dicom(64, 64)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + _flood_elements(count) + \
        struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq = (struct.pack("<HH2sHI", 0x0009, 0x0010, b"SQ", 0, 0xFFFFFFFF) + item
          + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 64 * 64) + bytes(range(256)) * 16
    return b"\0" * 128 + b"DICM" + _meta_bytes(ds.file_meta) + _dataset_bytes(ds) + sq + pixels
