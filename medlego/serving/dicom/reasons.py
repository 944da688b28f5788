"""The failure reasons an instance can get, STOW-RS's FailureReason (0008,1197) and DIMSE's C-STORE
status alike (PS3.18 10.5.3, PS3.4 GG.4): the standard's codes, and 0xC0xx "cannot understand"
codes of ours. Nothing imported here: `medlego dicom run` names them without loading the decoder."""

from __future__ import annotations

PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122  # not an image: an encapsulated PDF, an SR, a presentation state
OUT_OF_RESOURCES = 0xA700  # too large, or the server is overloaded
CANNOT_UNDERSTAND = 0xC000  # not DICOM, a broken header, pixels that do not decode
NO_RULE = 0xC001  # medlego: no routing rule matched the instance
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

_NAMES = {PROCESSING_FAILURE: "processing failure", SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
          OUT_OF_RESOURCES: "out of resources", CANNOT_UNDERSTAND: "cannot understand",
          NO_RULE: "no routing rule", TRANSFER_SYNTAX_NOT_SUPPORTED: "transfer syntax not supported"}


def reason_name(code: int) -> str:
    return _NAMES.get(code, "failure")
