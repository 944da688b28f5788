"""A deflate stream inflated only as far as it is read.

PNG image data and a deflated DICOM data set are both deflate streams, and either may be a
decompression bomb: a few MB that expand to gigabytes. Reading them through :class:`Inflater`
bounds the inflated size by what the decoder asks for (one band of rows, one header), never by
what the stream would expand to.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

_FEED_BYTES = 256 * 1024  # zlib copies the unconsumed input out after every call: feed it in pieces


class Inflater:
    """A zlib (``wbits`` = MAX_WBITS) or raw deflate (-MAX_WBITS) stream, read in order."""

    def __init__(self, pieces: Iterable, wbits: int):
        self._pieces = (view[i:i + _FEED_BYTES] for piece in pieces
                        for view in [memoryview(piece)] for i in range(0, len(view), _FEED_BYTES))
        self._inflate = zlib.decompressobj(wbits)
        self._tail: Any = b""  # compressed input not consumed yet
        self._pending = b""  # inflated bytes given back (push_back)

    def read(self, n: int) -> bytes:
        """Exactly n bytes, fewer only where the stream ends."""
        out = [self._pending[:n]]
        self._pending = self._pending[n:]
        have = len(out[0])
        while have < n and not self._inflate.eof:
            if not self._tail:
                self._tail = next(self._pieces, None)
                if self._tail is None:  # no input left: only what zlib still holds
                    self._tail = b""
                    chunk = self._inflate.decompress(b"", n - have)
                    if not chunk:
                        break
                    out.append(chunk)
                    have += len(chunk)
                    continue
            chunk = self._inflate.decompress(self._tail, n - have)
            self._tail = self._inflate.unconsumed_tail
            out.append(chunk)
            have += len(chunk)
        return b"".join(out)

    def push_back(self, data: bytes) -> None:
        """Inflated bytes read too far, served again by the next read."""
        self._pending = data + self._pending
