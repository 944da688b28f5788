"""One received DICOM instance: its header read (bounded: never the pixel data, a deflated data set
inflated only as far as a header can reach), what routing needs of it, and which failure reason
(``reasons.py``) an instance that cannot be diagnosed gets. A data set without pixel data is not an
image (every image storage SOP class has it): it is skipped with SOP class not supported.

Only identifiers and routing attributes are kept (:meth:`Instance.routing`, :meth:`Instance.audit`);
patient attributes stay in the data set, which only the SR builder reads (the SR belongs to the same
patient and study), never a log, metric or audit row.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

from medlego.runtime.errors import BadImageError, MedlegoError, OverloadedError, PayloadTooLargeError
from medlego.runtime.imaging.dicom_header import BOUNDED_SYNTAXES

from .reasons import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED,
                      TRANSFER_SYNTAX_NOT_SUPPORTED)

HEADER_BYTES = 4 * 1024 * 1024  # a deflated data set is inflated at most this far to read its header
_DEFLATED = "1.2.840.10008.1.2.1.99"


class InstanceFailure(Exception):
    """An instance that is not diagnosed: its failure reason and a one-line explanation."""

    def __init__(self, code: int, reason: str, sop_class: str = "", sop_instance: str = "",
                 ids: dict[str, str] | None = None):
        super().__init__(reason)
        self.code, self.reason = code, reason
        self.sop_class, self.sop_instance = sop_class, sop_instance
        self.ids = ids or {}  # the instance's UIDs (Instance.audit) when its header was read


@dataclass
class Instance:
    data: bytes  # the Part 10 file as received (what the decoder reads)
    header: Any  # pydicom Dataset without pixel data (the SR's evidence)
    syntax: str

    def uid(self, keyword: str) -> str:
        return str(getattr(self.header, keyword, "") or "")

    def routing(self, calling_ae: str = "") -> dict[str, str]:
        h = self.header
        return {"modality": str(getattr(h, "Modality", "") or ""),
                "body_part": str(getattr(h, "BodyPartExamined", "") or ""),
                "sop_class": self.uid("SOPClassUID"),
                "series_description": str(getattr(h, "SeriesDescription", "") or ""),
                "calling_ae": calling_ae}

    def audit(self, calling_ae: str = "") -> dict[str, str]:
        """The identifiers an audit row carries: UIDs and the calling AE, never patient attributes."""
        return {"study_uid": self.uid("StudyInstanceUID"), "series_uid": self.uid("SeriesInstanceUID"),
                "sop_instance_uid": self.uid("SOPInstanceUID"), "sop_class_uid": self.uid("SOPClassUID"),
                **({"calling_ae": calling_ae} if calling_ae else {})}


def read_instance(data: bytes, max_bytes: int) -> Instance:
    """A received file → :class:`Instance`, or :class:`InstanceFailure` (blocking: call it off the loop)."""
    from pydicom.errors import InvalidDicomError

    if len(data) > max_bytes:
        raise InstanceFailure(OUT_OF_RESOURCES, f"instance is {len(data)} bytes, above the limit of {max_bytes}")
    _check_bounded(data)
    try:
        header, syntax, has_pixels = _read_header(data)
    except InvalidDicomError:
        raise InstanceFailure(CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no 'DICM' after the preamble)") from None
    except Exception as e:  # a truncated or garbled header
        raise InstanceFailure(CANNOT_UNDERSTAND, f"the DICOM header cannot be read: {_one_line(e)}") from None
    inst = Instance(data=data, header=header, syntax=syntax)
    sop_class, sop_instance, ids = inst.uid("SOPClassUID"), inst.uid("SOPInstanceUID"), inst.audit()
    if not sop_class or not sop_instance or not inst.uid("StudyInstanceUID"):
        raise InstanceFailure(CANNOT_UNDERSTAND, "the instance has no SOP Class, SOP Instance or Study UID",
                              sop_class, sop_instance, ids)
    if not has_pixels:
        raise InstanceFailure(SOP_CLASS_NOT_SUPPORTED, f"not an image (SOP class {_class_name(sop_class)} "
                              "has no pixel data): nothing to diagnose", sop_class, sop_instance, ids)
    if syntax not in BOUNDED_SYNTAXES:
        raise InstanceFailure(TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {syntax or '(none)'} is not supported",
                              sop_class, sop_instance, ids)
    return inst


def _check_bounded(data: bytes) -> None:
    """The decoder's own bounded walk first (runtime/imaging: elements counted, the decode deadline):
    pydicom, which reads the header below, would parse a flood of millions of elements for seconds."""
    from medlego.runtime.errors import ImageTooCostlyError
    from medlego.runtime.imaging import check_dicom_header

    if data[128:132] != b"DICM":
        return  # not Part 10: _read_header's reader names it
    try:
        check_dicom_header(data, any_syntax=True)  # an unsupported syntax is reported below, with the UIDs
    except ImageTooCostlyError as e:
        raise InstanceFailure(OUT_OF_RESOURCES, _one_line(e)) from None
    except BadImageError as e:
        raise InstanceFailure(CANNOT_UNDERSTAND, _one_line(e)) from None


def _read_header(data: bytes):
    """(header without pixel data, transfer syntax UID, whether it holds pixel data)."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)  # InvalidDicomError without 'DICM'
    meta = _read_file_meta_info(fp)  # (the public reader takes a path only)
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if syntax != _DEFLATED:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return header, syntax, _has_pixel_data(data, header)
    # deflated: pydicom would inflate all of it (a bomb's ratio is unbounded); a header needs little
    body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[fp.tell():], HEADER_BYTES)
    header = read_dataset(io.BytesIO(body), False, True, stop_when=_at_pixels)
    header.file_meta = meta
    return header, syntax, "Rows" in header


def _at_pixels(tag, vr, length) -> bool:
    return tag >= 0x7FE00000


def _has_pixel_data(data: bytes, header) -> bool:
    """Whether the data set holds Pixel Data (or float/double pixel data): found by reading with
    pixels, deferred (pydicom then skips the value instead of reading it)."""
    if "FloatPixelData" in header or "DoubleFloatPixelData" in header:
        return True
    import pydicom

    full = pydicom.dcmread(io.BytesIO(data), defer_size=256, specific_tags=["PixelData"])
    return "PixelData" in full


def _class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"'{name}'" if name and name != uid else uid


def failure_of(error: BaseException) -> tuple[int, str]:
    """The failure reason of an error the diagnosis raised (a MedlegoError from the contract)."""
    text = _one_line(error)
    if isinstance(error, PayloadTooLargeError | OverloadedError):
        return OUT_OF_RESOURCES, text
    if isinstance(error, BadImageError):
        return (TRANSFER_SYNTAX_NOT_SUPPORTED if "transfer syntax" in text else CANNOT_UNDERSTAND), text
    if isinstance(error, MedlegoError):
        return PROCESSING_FAILURE, text
    return PROCESSING_FAILURE, "internal error while diagnosing the instance"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:400] or type(error).__name__
