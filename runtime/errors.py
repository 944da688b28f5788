"""The small exception hierarchy that the CLI and the servers map to exit codes and statuses.

Every error here is a *user* mistake or a capacity condition: its message is one line that
says what is wrong and, where it helps, what exists instead. Internal invariants use assert.
"""


class MedlegoError(Exception):
    """Base of every expected, user-facing error. Servers answer 4xx/503, never 500."""

    status = 400


class AdapterFormatError(MedlegoError, ValueError):
    """An adapter file is not a valid medlego SVD-LoRA adapter (format, tensors, shapes, values)."""

    status = 422


class IncompatibleAdapterError(AdapterFormatError):
    """A valid adapter that was made for a different base model than the resident one."""


class AdapterNotFoundError(MedlegoError, LookupError):
    """A name, version or alias that the registry does not hold."""

    status = 404

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else "adapter not found"


class TaskNotFoundError(MedlegoError, LookupError):
    """A task that the named adapter does not carry (or a missing task on a multi-task adapter)."""

    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not found"


class BadImageError(MedlegoError, ValueError):
    """An image that cannot be decoded, is too large, or is of an unsupported format."""

    status = 400


class BadInputError(MedlegoError, ValueError):
    """Any other invalid user input (dataset, flags, request fields)."""

    status = 400


class AdapterPinnedError(MedlegoError):
    """An operation (delete) refused because the adapter is pinned."""

    status = 409


class ConflictError(MedlegoError):
    """An operation that conflicts with the current state (e.g. name already taken)."""

    status = 409


class OverloadedError(MedlegoError):
    """The request queue is full; the caller should retry later."""

    status = 503
    retry_after_s = 1


class BaseModelError(MedlegoError, ValueError):
    """A base model name or weights file that cannot be used."""

    status = 400
