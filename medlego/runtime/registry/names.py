"""What a registry name, alias and reference may look like, checked before any database sees it.

A reference is ``name`` (the latest version, or an alias), or ``name@version``. Everything here
raises a one-line :class:`BadInputError`: a string that could never name an adapter (a newline, a
NUL byte, a lone surrogate, a version past the index's integer range) must not reach SQLite or
PostgreSQL, whose drivers would fail with errors of their own.
"""

from __future__ import annotations

import re

from ..errors import BadInputError

MAX_NAME = 128
MAX_VERSION = 2**31 - 1  # PostgreSQL INTEGER; nobody registers two billion versions of one name

# \Z, not $: '$' also matches before a trailing newline, so "evil\n" would pass.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,%d}\Z" % (MAX_NAME - 1))
# ASCII digits only: str.isdigit() is True for '²' and other Unicode digits that int() refuses.
_VERSION = re.compile(r"[0-9]{1,10}\Z")


def _shown(value: str) -> str:
    """The value for an error message: repr escapes newlines and surrogates; long ones are cut."""
    return repr(value if len(value) <= 2 * MAX_NAME else value[:2 * MAX_NAME] + "…")


def check_name(name, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        shown = _shown(name) if isinstance(name, str) else type(name).__name__
        raise BadInputError(f"bad adapter {what} {shown}: use letters, digits, '.', '_' or '-' (max {MAX_NAME})")
    return name


def check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise BadInputError(f"bad adapter version {version!r}: a number from 1 to {MAX_VERSION}")
    return version


def parse_ref(ref) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3). Raises BadInputError for anything malformed."""
    if not isinstance(ref, str):
        raise BadInputError(f"bad adapter reference: expected a string, got {type(ref).__name__}")
    name, at, ver = ref.rpartition("@")
    if not at:
        return check_name(ref), None
    if not _VERSION.match(ver) or not 1 <= int(ver) <= MAX_VERSION:
        raise BadInputError(f"bad adapter reference {_shown(ref)}: the version after '@' must be a number "
                            f"from 1 to {MAX_VERSION}")
    return check_name(name), int(ver)
