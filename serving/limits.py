"""Request limits, and image decoding checked against them (format by content, size, dimensions).

Every check raises a :class:`MedlegoError` with a one-line message, so a server answers 4xx
(413 for something too large, 400 for something malformed), never 500.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from medlego.runtime.errors import BadImageError, BadInputError, MedlegoError
from medlego.runtime.imaging import decode_image, sniff_format


class PayloadTooLargeError(MedlegoError):
    """A request body, an image or an adapter upload above its configured limit."""

    status = 413


@dataclass
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024  # a whole HTTP request / gRPC message
    max_image_bytes: int = 16 * 1024 * 1024  # one encoded image
    max_image_pixels: int = 40_000_000  # decoded width × height (decompression-bomb guard)
    max_image_side: int = 16384  # decoded width or height
    max_adapter_bytes: int = 64 * 1024 * 1024  # one adapter upload
    max_batch_images: int = 64  # images in one batch request
    max_top_k: int = 1000

    def check_image_bytes(self, data: bytes) -> str:
        """Size and magic bytes; returns the format ('png' | 'jpeg' | 'dicom')."""
        if not data:
            raise BadImageError("empty image: send the PNG, JPEG or DICOM file content")
        if len(data) > self.max_image_bytes:
            raise PayloadTooLargeError(f"image is {len(data)} bytes, above the limit of {self.max_image_bytes}")
        fmt = sniff_format(data)
        if fmt is None:
            raise BadImageError("unsupported image format: expected PNG, JPEG or DICOM content (checked by content, not name)")
        return fmt

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded bytes → float32 [H, W] or [H, W, 3] in [0, 1], within every limit."""
        self.check_image_bytes(data)
        image = decode_image(data, max_pixels=self.max_image_pixels)
        h, w = image.shape[:2]
        if h < 1 or w < 1:
            raise BadImageError(f"image has no pixels ({w}x{h})")
        if max(h, w) > self.max_image_side:
            raise BadImageError(f"image is {w}x{h}; the largest side allowed is {self.max_image_side} pixels")
        return image

    def check_top_k(self, top_k: int | None) -> int | None:
        if top_k is None:
            return None
        if not 1 <= int(top_k) <= self.max_top_k:
            raise BadInputError(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        return int(top_k)

    def check_batch(self, n: int) -> None:
        if n < 1:
            raise BadInputError("a batch request needs at least one image")
        if n > self.max_batch_images:
            raise PayloadTooLargeError(f"{n} images in one batch; the limit is {self.max_batch_images}")

    def check_adapter_bytes(self, data: bytes) -> None:
        if not data:
            raise BadInputError("empty adapter upload: send the .safetensors file content")
        if len(data) > self.max_adapter_bytes:
            raise PayloadTooLargeError(f"adapter upload is {len(data)} bytes, above the limit of {self.max_adapter_bytes}")


def decode_base64(text: str, what: str = "image") -> bytes:
    """Standard or URL-safe base64 (a data: URL prefix is accepted) → bytes, or a 400."""
    if not isinstance(text, str) or not text:
        raise BadInputError(f"'{what}' must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError(f"'{what}' is not valid base64") from None
