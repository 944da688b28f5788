"""A streaming ``multipart/related`` reader for STOW-RS bodies (RFC 2387 / PS3.18 8.6.1.2).

Bodies arrive in pieces, often chunked with no Content-Length (Orthanc's DICOMweb client): the
reader is fed each piece and keeps only the part being read, plus a delimiter's length of look-behind.
A part above ``max_part`` bytes is not kept: its bytes are counted and dropped, and the part is
reported too large (the instance gets its own failure reason, the others are still diagnosed).
Headers of a part are bounded too. A body that breaks the framing is a :class:`MultipartError`
(400). ``feed`` does the byte searching; the STOW route calls it in a worker thread for each
megabyte, so a large body never holds the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message

from medlego.runtime.errors import BadInputError, MultipartError

MAX_HEADER_BYTES = 16 * 1024  # one part's headers
MAX_BOUNDARY = 200


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    data: bytes | None = None  # None: dropped, above max_part
    size: int = 0

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def boundary_of(content_type: str, expected: str = "application/dicom") -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` content type, or a 400/415 line."""
    m = Message()
    m["content-type"] = content_type or ""
    if m.get_content_type() != "multipart/related":
        raise BadInputError(f"STOW-RS takes multipart/related; type=\"{expected}\", got '{content_type or 'no content type'}'")
    kind = m.get_param("type")
    if isinstance(kind, str) and kind.lower() != expected:
        raise BadInputError(f"STOW-RS here takes parts of type {expected}, not '{kind}' (send DICOM Part 10 files)")
    boundary = m.get_param("boundary")
    # RFC 2046 allows 70 characters; Orthanc's DICOMweb client sends 73 (two UUIDs): be lenient, bounded
    if not isinstance(boundary, str) or not 0 < len(boundary) <= MAX_BOUNDARY:
        raise MultipartError(f"multipart/related without a boundary parameter (1-{MAX_BOUNDARY} characters)")
    return boundary.encode("latin-1", "replace")


class MultipartReader:
    def __init__(self, boundary: bytes, max_part: int, max_parts: int):
        self.delimiter = b"\r\n--" + boundary
        self.max_part, self.max_parts = max_part, max_parts
        self.parts: list[Part] = []
        self._buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it: one is supplied
        self._state = "preamble"  # preamble | delimiter | headers | body | end
        self._part: Part | None = None
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self._step():
            pass

    def close(self) -> list[Part]:
        if self._state != "end":
            raise MultipartError("the multipart body ended before its closing delimiter")
        return self.parts

    def _step(self) -> bool:
        """Advance over what the buffer holds; False when it needs more bytes."""
        if self._state == "preamble":
            return self._preamble()
        if self._state == "headers":
            return self._headers()
        if self._state == "body":
            return self._body()
        if self._state == "delimiter":  # the buffer starts with a delimiter
            return self._after_delimiter(0)
        self._buf.clear()  # an epilogue after the closing delimiter is ignored
        return False

    def _preamble(self) -> bool:
        at = self._buf.find(self.delimiter)
        if at < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError("no multipart boundary in the first bytes of the body")
            return False
        del self._buf[:at]
        self._state = "delimiter"
        return True

    def _after_delimiter(self, at: int) -> bool:
        """At a delimiter found at `at`: the closing one (``--``) ends the body, else a part begins."""
        end = at + len(self.delimiter)
        if len(self._buf) < end + 2:
            return False
        tail = bytes(self._buf[end:end + 2])
        if tail == b"--":
            self._state = "end"
            self._buf.clear()
            return False
        line_end = self._buf.find(b"\r\n", end)  # transport padding (spaces) may follow a delimiter
        if line_end < 0:
            if len(self._buf) - end > 256:
                raise MultipartError("garbage after a multipart boundary")
            return False
        if self._buf[end:line_end].strip(b" \t"):
            raise MultipartError("garbage after a multipart boundary")
        del self._buf[:line_end + 2]
        if len(self.parts) >= self.max_parts:
            raise MultipartError(f"more than {self.max_parts} instances in one request")
        self._part, self._chunks, self._state = Part(), [], "headers"
        return True

    def _headers(self) -> bool:
        at = self._buf.find(b"\r\n\r\n")
        if at < 0 and self._buf.startswith(b"\r\n"):
            at = -2  # a part with no headers at all
        elif at < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
            return False
        assert self._part is not None
        for line in bytes(self._buf[:max(at, 0)]).split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                raise MultipartError("a malformed header line in a multipart part")
            self._part.headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        del self._buf[:at + 4]
        self._state = "body"
        return True

    def _body(self) -> bool:
        assert self._part is not None
        at = self._buf.find(self.delimiter)
        keep = len(self.delimiter) - 1 if at < 0 else 0  # a delimiter may straddle two pieces
        upto = at if at >= 0 else max(0, len(self._buf) - keep)
        if upto:
            self._take(bytes(self._buf[:upto]))
            del self._buf[:upto]
        if at < 0:
            return False
        part = self._part
        part.data = b"".join(self._chunks) if part.size <= self.max_part else None
        self.parts.append(part)
        self._chunks = []
        self._state = "delimiter"
        return True

    def _take(self, data: bytes) -> None:
        assert self._part is not None
        self._part.size += len(data)
        if self._part.size <= self.max_part:
            self._chunks.append(data)
        else:
            self._chunks = []  # above the limit: counted, not kept
