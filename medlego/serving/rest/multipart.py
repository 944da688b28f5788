"""multipart/form-data parsed in worker threads as the body streams in.

Starlette's ``request.form()`` runs python-multipart's parser on the event loop, chunk by chunk, and
writes file parts to temporary files from there: a 30 MB upload held every other request (``/healthz``
included) while it parsed. Here the loop only receives the body (``BodyLimitMiddleware`` caps it);
each megabyte is handed to a worker thread that parses it, and file parts are spooled to a temporary
file past 1 MB as Starlette does, so that a file is held in memory once, when it is read back whole.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from medlego.runtime.errors import BadInputError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_PARTS = 256
MAX_FIELD_BYTES = 64 * 1024  # a text field (adapter name, task, alias …); files are bounded by the body
SPOOL_BYTES = 1 << 20  # a file part past this goes to a temporary file until it is read back whole


@dataclass
class FilePart:
    filename: str
    data: bytes


@dataclass
class Form:
    """The parts in the order they came: text fields as str, files as FilePart."""

    parts: list[tuple[str, str | FilePart]] = field(default_factory=list)

    def getlist(self, name: str) -> list[str | FilePart]:
        return [value for key, value in self.parts if key == name]

    def get(self, name: str) -> str | FilePart | None:
        values = self.getlist(name)
        return values[0] if values else None


class _Collector:
    """python-multipart's callbacks → a Form, within the part limits."""

    def __init__(self) -> None:
        self.form = Form()
        self.header_field, self.header_value = bytearray(), bytearray()
        self.disposition = b""
        self.chunks: list[bytes] = []
        self.spool: tempfile.SpooledTemporaryFile | None = None
        self.size = 0

    def callbacks(self) -> "MultipartCallbacks":
        return cast("MultipartCallbacks", {"on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_header_field": lambda d, s, e: self.header_field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self.header_value.extend(d[s:e]),
                "on_header_end": self.header_end})

    def part_begin(self) -> None:
        if len(self.form.parts) >= MAX_PARTS:
            raise BadInputError(f"malformed multipart body: more than {MAX_PARTS} parts")
        self.disposition, self.chunks, self.spool, self.size = b"", [], None, 0

    def header_end(self) -> None:
        if bytes(self.header_field).lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if b"filename" not in self.disposition:
            if self.size > MAX_FIELD_BYTES:
                raise BadInputError(f"malformed multipart body: a field is above {MAX_FIELD_BYTES} bytes")
            self.chunks.append(data[start:end])
            return
        if self.spool is None:
            self.spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES)
        self.spool.write(data[start:end])

    def part_end(self) -> None:
        _, options = parse_options_header(self.disposition)
        name = options.get(b"name")
        if name is None:
            raise BadInputError("malformed multipart body: a part has no Content-Disposition name")
        data = b"".join(self.chunks) if self.spool is None else self._spooled()
        filename = options.get(b"filename")
        value: str | FilePart
        if filename is not None:
            value = FilePart(filename.decode("utf-8", "replace"), data)
        else:
            try:
                value = data.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInputError(f"malformed multipart body: field '{name.decode(errors='replace'):.60}' "
                                    "is not UTF-8 text") from None
        self.form.parts.append((name.decode("utf-8", "replace"), value))

    def _spooled(self) -> bytes:
        assert self.spool is not None
        with self.spool:
            self.spool.seek(0)
            return self.spool.read()


class FormParser:
    """One multipart/form-data body: `feed` its chunks in order, then `finish`, each in a worker thread."""

    def __init__(self, content_type: str) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadInputError("malformed multipart body: the content type has no boundary")
        self.collector = _Collector()
        self.parser = MultipartParser(boundary, self.collector.callbacks())
        self.fed = 0

    def feed(self, chunk: bytes) -> None:
        self.fed += len(chunk)
        try:
            self.parser.write(chunk)
        except BadInputError:
            raise
        except Exception as e:  # python-multipart's own parse errors: a garbled stream
            raise BadInputError(f"malformed multipart body: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def finish(self) -> Form:
        if self.fed and self.parser.state != MultipartState.END:
            raise BadInputError("malformed multipart body: it ends before its closing boundary")
        return self.collector.form

