"""Every expected error of medlego, and the one table that maps each to its answer.

Every error here is a *user* mistake or a capacity condition: its message is one line that
says what is wrong and, where it helps, what exists instead. Internal invariants use assert.

Each class carries its answer on every transport, ``answer = (HTTP status, gRPC code, outcome)``:
the gRPC code is the name of a ``grpc.StatusCode`` (a name, so that the runtime needs no gRPC
import) and the outcome is the ``outcome`` label of the request metrics. The CLI turns any of
them into one line and exit 2. Anything that is not a :class:`MedlegoError` is a bug: HTTP 500,
``INTERNAL``, outcome ``error``.
"""

from __future__ import annotations


class MedlegoError(Exception):
    """Base of every expected, user-facing error. Servers answer 4xx/503, never 500."""

    answer: tuple[int, str, str] = (400, "INVALID_ARGUMENT", "bad_request")

    @property
    def status(self) -> int:
        return self.answer[0]

    @property
    def grpc_code(self) -> str:
        return self.answer[1]

    @property
    def outcome(self) -> str:
        return self.answer[2]


# -- 400: the request itself is wrong ---------------------------------------------------------------
class BadInputError(MedlegoError, ValueError):
    """Any invalid user input (dataset, flags, request fields, references)."""


class MultipartError(BadInputError):
    """A body that is not well-formed multipart (the DICOM door's multipart/related)."""


class BadImageError(MedlegoError, ValueError):
    """An image that cannot be decoded, or is of an unsupported format."""


class BaseModelError(MedlegoError, ValueError):
    """A base model name or weights file that cannot be used."""


# -- 401 / 403: credentials --------------------------------------------------------------------------
class UnauthenticatedError(MedlegoError):
    """No credentials where some are required."""

    answer = (401, "UNAUTHENTICATED", "unauthorized")


class ForbiddenError(MedlegoError):
    """Wrong credentials, or an API that is closed by configuration."""

    answer = (403, "PERMISSION_DENIED", "forbidden")


# -- 404: names that do not exist --------------------------------------------------------------------
class _NotFound(MedlegoError, LookupError):
    answer = (404, "NOT_FOUND", "not_found")

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else "not found"


class AdapterNotFoundError(_NotFound):
    """A name, version or alias that the registry does not hold."""


class TaskNotFoundError(_NotFound):
    """A task that the named adapter does not carry (or a missing task on a multi-task adapter)."""


# -- 409: conflicts with the current state ----------------------------------------------------------
class ConflictError(MedlegoError):
    """An operation that conflicts with the current state (a name already taken, an alias in the way)."""

    answer = (409, "FAILED_PRECONDITION", "conflict")


class AdapterPinnedError(ConflictError):
    """An operation (delete) refused because the adapter is pinned."""


# -- 413: too large ----------------------------------------------------------------------------------
class PayloadTooLargeError(MedlegoError):
    """A request body, an image (encoded or decoded) or an adapter upload above its limit."""

    answer = (413, "RESOURCE_EXHAUSTED", "too_large")


# -- 422: well-formed, but not a usable adapter --------------------------------------------------------
class ImageTooCostlyError(BadImageError):
    """An image whose decoding would cost more than any honest image of its size: a header of too
    many elements and items, or a decode past its deadline whose thread computed for over a fifth of
    it (imaging/bands.py). The input is the cause, so a retry would not help (never 503)."""

    answer = (422, "INVALID_ARGUMENT", "bad_request")


class AdapterFormatError(MedlegoError, ValueError):
    """An adapter file is not a valid medlego SVD-LoRA adapter (format, tensors, shapes, values)."""

    answer = (422, "INVALID_ARGUMENT", "invalid")


class IncompatibleAdapterError(AdapterFormatError):
    """A valid adapter that was made for a different base model than the resident one."""


class AdapterNumericError(AdapterFormatError):
    """An adapter whose factors or heads overflow in the serving dtype, or that produced NaN/Inf."""


class ExportError(AdapterFormatError):
    """An ONNX export whose result does not match the engine, or cannot be written."""


# -- 503: capacity -----------------------------------------------------------------------------------
class OverloadedError(MedlegoError):
    """No capacity right now (queue full, every device slot pinned or busy); retry later."""

    answer = (503, "RESOURCE_EXHAUSTED", "overloaded")  # the gRPC code clients of earlier versions retry on
    retry_after_s = 1


class StorageUnavailableError(OverloadedError):
    """The registry's database or object store cannot be reached right now."""


# -- 507: no space left --------------------------------------------------------------------------------
class StorageFullError(MedlegoError):
    """The registry's disk (its folder store or its index database) is full or over quota: nothing was written."""

    answer = (507, "RESOURCE_EXHAUSTED", "storage_full")


# -- 502: a system downstream ------------------------------------------------------------------------
class DestinationError(MedlegoError):
    """A DICOM destination (a PACS, over STOW-RS or C-STORE) did not take a result."""

    answer = (502, "UNAVAILABLE", "destination_failed")


INTERNAL = (500, "INTERNAL", "error")  # the answer to anything that is not a MedlegoError


def answer_of(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, gRPC code name, metrics outcome) for any exception."""
    return error.answer if isinstance(error, MedlegoError) else INTERNAL


def error_class(name: str) -> type[MedlegoError] | None:
    """The MedlegoError subclass called `name` (errors cross process boundaries by name, never pickled)."""
    pending = [MedlegoError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None
