"""Request limits (:class:`medlego.runtime.config.Limits`) applied at the door.

Every check raises a :class:`MedlegoError` with a one-line message, so a server answers 4xx
(413 for something too large, 400 for something malformed), never 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from medlego.runtime.config import Limits
from medlego.runtime.errors import BadImageError, BadInputError, PayloadTooLargeError
from medlego.runtime.imaging import decode_image, sniff_format

_DIGITS = re.compile(r"[0-9]{1,10}\Z")


def check_image_bytes(limits: Limits, data: bytes) -> str:
    """Size and magic bytes; returns the format ('png' | 'jpeg' | 'dicom')."""
    if not data:
        raise BadImageError("empty image: send the PNG, JPEG or DICOM file content")
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLargeError(f"image is {len(data)} bytes, above the limit of {limits.max_image_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImageError("unsupported image format: expected PNG, JPEG or DICOM content (checked by content, not name)")
    return fmt


def decode(limits: Limits, data: bytes, target_size: int | None = None) -> np.ndarray:
    """Encoded bytes → float32 [H, W] or [H, W, 3] in [0, 1], within every limit; with target_size,
    already resized to target_size × target_size (see decode_image)."""
    check_image_bytes(limits, data)
    image = decode_image(data, max_pixels=limits.max_image_pixels, max_side=limits.max_image_side,
                         target_size=target_size, deadline_s=limits.decode_deadline_s)
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise BadImageError(f"image has no pixels ({w}x{h})")
    if max(h, w) > limits.max_image_side:
        raise BadImageError(f"image is {w}x{h}; the largest side allowed is {limits.max_image_side} pixels")
    return image


def check_top_k(limits: Limits, top_k) -> int | None:
    """None, or an integer in [1, max_top_k] (a bool, float, huge or non-numeric value is a 400)."""
    if top_k is None or top_k == "":
        return None
    if isinstance(top_k, str) and _DIGITS.match(top_k.strip()):
        top_k = int(top_k.strip())
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise BadInputError(f"top_k must be an integer between 1 and {limits.max_top_k}, got {_short(top_k)}")
    if not 1 <= top_k <= limits.max_top_k:
        raise BadInputError(f"top_k must be between 1 and {limits.max_top_k}, got {_short(top_k)}")
    return top_k


def check_text(value, field: str, required: bool = False) -> str | None:
    """A name-like request field: a string of printable UTF-8 (no lone surrogates), at most 256 characters."""
    if value is None or value == "":
        if required:
            raise BadInputError(f"'{field}' is required")
        return None
    if not isinstance(value, str):
        raise BadInputError(f"'{field}' must be a string, got {type(value).__name__}")
    if len(value) > 256:
        raise BadInputError(f"'{field}' is {len(value)} characters long; at most 256")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"'{field}' is not valid UTF-8 text") from None
    if not value.isprintable():
        raise BadInputError(f"'{field}' contains control characters")
    return value


def check_batch(limits: Limits, n: int) -> None:
    if n < 1:
        raise BadInputError("a batch request needs at least one image")
    if n > limits.max_batch_images:
        raise PayloadTooLargeError(f"{n} images in one batch; the limit is {limits.max_batch_images}")


ADAPTER_ENVELOPE = 1024 * 1024  # an adapter upload's multipart or protobuf framing around the file


def upload_limit(limits: Limits) -> int:
    """The largest request a route that takes an adapter upload accepts: REST's ``/v1/adapters`` body
    and every gRPC message (one gRPC server takes uploads and images alike)."""
    return max(limits.max_body_bytes, limits.max_adapter_bytes + ADAPTER_ENVELOPE)


def body_limit(limits: Limits, path: str) -> int:
    """The largest HTTP request body at `path` (BodyLimitMiddleware refuses more before reading it)."""
    # a STOW-RS body holds a study's instances (each within max_image_bytes): the upload limit too
    return upload_limit(limits) if path.startswith(("/v1/adapters", "/dicom-web/")) else limits.max_body_bytes


def valid_request_id(value: str) -> bool:
    """A client's request id (``X-Request-ID`` header, ``x-request-id`` gRPC metadata) worth keeping:
    1-128 of ``A-Za-z0-9._:-``; anything else is replaced by a fresh id."""
    return 0 < len(value) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:-") for c in value)


def check_adapter_bytes(limits: Limits, data: bytes) -> None:
    if not data:
        raise BadInputError("empty adapter upload: send the .safetensors file content")
    if len(data) > limits.max_adapter_bytes:
        raise PayloadTooLargeError(f"adapter upload is {len(data)} bytes, above the limit of {limits.max_adapter_bytes}")


def parse_json(raw: bytes, max_elements: int | None = None):
    """A JSON request body, refusing NaN/Infinity, integers of more than 18 digits and deep nesting (400),
    and (with `max_elements`) a body of more values than that (413), counted before parsing.

    Call it in a worker thread for a body of any size (:func:`parse_json_off_loop`): numbers go
    through Python hooks, so the parsing thread gives the event loop its turn every few ms (the C
    parser holds the interpreter lock from start to end otherwise: 0.4 s for 2 M floats)."""
    if max_elements is not None:
        values = raw.count(b",") + 1  # an upper bound of the values (a comma inside a string counts too)
        if values > max_elements:
            raise PayloadTooLargeError(f"the JSON body holds about {values} values; the limit is {max_elements} "
                                       f"(send large tensors as binary data)")

    def no_constant(name: str):
        raise BadInputError(f"the JSON body contains {name}, which is not a number JSON allows")

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > 18:
            raise BadInputError(f"the JSON body contains an integer of {len(text)} digits")
        return int(text)

    try:
        return json.loads(raw or b"null", parse_constant=no_constant, parse_int=bounded_int, parse_float=_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"request body is not valid JSON: {e}") from None
    except RecursionError:  # the C parser recurses per nesting level and stops at the interpreter's limit
        raise BadInputError("the JSON body is nested too deeply") from None


def _float(text: str) -> float:
    return float(text)  # a Python frame per number: the parsing thread lets the event loop run


async def read_body(request) -> bytes:
    """A request's whole body (bounded by the app's BodyLimitMiddleware); a client that goes away before
    sending all of it is a 400 that names it, not an internal error with a traceback."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise BadInputError("the client closed the connection before its whole request body arrived") from None


async def parse_json_off_loop(raw: bytes, limits: Limits):
    """:func:`parse_json` in a worker thread, within ``limits.max_json_elements``."""
    return await run_in_threadpool(parse_json, raw, limits.max_json_elements)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_base64(text, what: str = "image") -> bytes:
    """Standard or URL-safe base64 (a data: URL prefix is accepted; whitespace is ignored) → bytes, or a 400.

    Every pass is over one piece of _B64_PIECE characters, never the whole string: each piece is a Python
    step, so a worker thread decoding megabytes lets the event loop (and /healthz) run between them."""
    if not isinstance(text, str) or not text:
        raise BadInputError(f"'{what}' must be a non-empty base64 string")
    start = text.index(",") + 1 if text.startswith("data:") and "," in text else 0
    out: list[bytes] = []
    carry, padding = "", 0  # carry: < 4 data characters left from the last piece; padding: '=' seen at the end
    try:
        for i in range(start, len(text), _B64_PIECE):
            piece = _canonical(text[i:i + _B64_PIECE])
            if padding:
                if piece.strip("="):
                    raise ValueError("data after the padding")
                padding += len(piece)
                continue
            if "=" in piece:
                data = piece.rstrip("=")
                if "=" in data:
                    raise ValueError("padding inside the data")
                padding, piece = len(piece) - len(data), data
            piece = carry + piece
            whole = len(piece) - len(piece) % 4
            out.append(base64.b64decode(piece[:whole], validate=True))
            carry = piece[whole:]
        padding += -(len(carry) + padding) % 4
        if padding > 2:  # the same rule as a whole-string decode: '=' only in the last two places
            raise ValueError("too much padding")
        out.append(base64.b64decode(carry + "=" * padding, validate=True))
    except (binascii.Error, ValueError):
        raise BadInputError(f"'{what}' is not valid base64") from None
    return b"".join(out)


def _canonical(piece: str) -> str:
    """One piece without whitespace and with the URL-safe alphabet mapped to the standard one."""
    piece = "".join(piece.split())
    if "-" in piece or "_" in piece:
        piece = piece.replace("-", "+").replace("_", "/")
    return piece


_B64_PIECE = 1 << 20  # characters (a multiple of 4)
