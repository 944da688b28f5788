"""The registry's index database: one small interface over SQLite and PostgreSQL.

The registry writes its SQL once, with ``?`` placeholders and PostgreSQL's row locks
(``FOR UPDATE`` / ``FOR SHARE``); each backend translates that text for its driver (SQLite takes
no row locks: ``BEGIN IMMEDIATE`` already serializes its writers). :meth:`Index.read` is one
statement outside any transaction (one round trip: the resolve path); :meth:`Index.write` runs a
function in one transaction and runs it again when the database reports a race that a retry
resolves (two writers inserting the same ``(name, version)``, a deadlock).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import BadInputError, ConflictError

T = TypeVar("T")
WRITE_ATTEMPTS = 20  # a burst of same-name registrations loses at most this many races in a row


class Tx:
    """The statements of one write transaction."""

    def __init__(self, execute, lock_names):
        self._execute = execute  # (sql, params) -> cursor
        self.lock_names = lock_names  # (shared: list[str], exclusive: list[str]) -> None

    def all(self, sql: str, params=()) -> list[tuple]:
        return self._execute(sql, params).fetchall()

    def one(self, sql: str, params=()) -> tuple | None:
        return self._execute(sql, params).fetchone()

    def run(self, sql: str, params=()) -> int:
        """Execute; the number of rows it changed."""
        return self._execute(sql, params).rowcount


class Index:
    """Implemented by :class:`~.index_sqlite.SqliteIndex` and :class:`~.index_postgres.PostgresIndex`."""

    #: exceptions after which the whole transaction is simply tried again
    retryable: tuple[type[BaseException], ...] = ()

    def read(self, sql: str, params=()) -> list[tuple]:
        raise NotImplementedError

    def _transaction(self):
        """Context manager yielding a :class:`Tx`; commits on success, rolls back on any exception."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def write(self, fn: Callable[[Tx], T]) -> T:
        """fn(tx) in one transaction; the result of the first attempt that commits."""
        attempts = 0
        while True:
            try:
                with self._transaction() as tx:
                    return fn(tx)
            except self.retryable:
                attempts += 1
                if attempts == WRITE_ATTEMPTS:
                    raise ConflictError("the registry is busy with concurrent writes to the same names; retry") from None


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name (prefixed so as not to meet other users' keys)."""
    digest = hashlib.sha256(b"medlego-registry-name:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


FLEET_EXTRA = 'pip install "medlego[fleet]"'


def missing_extra(error: ModuleNotFoundError, what: str) -> BadInputError:
    """A backend whose client library is not installed: one line naming the extra that brings it."""
    return BadInputError(f"{what} needs the fleet extra, which is not installed (no module named "
                         f"{(error.name or '?').split('.')[0]!r}): {FLEET_EXTRA}")


def open_index(url: str | None, data_dir: Path) -> Index:
    """None or 'sqlite': ``<data_dir>/registry.db``; ``postgresql://…``: a shared PostgreSQL database."""
    if url in (None, "", "sqlite"):
        from .index_sqlite import SqliteIndex

        return SqliteIndex(data_dir / "registry.db")
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        try:
            from .index_postgres import PostgresIndex
        except ModuleNotFoundError as e:
            raise missing_extra(e, "a postgresql:// registry") from None
        return PostgresIndex(url)
    raise BadInputError(f"unsupported registry URL {redact(url)!r}: use 'sqlite' (the default, "
                        "<data-dir>/registry.db) or postgresql://USER@HOST:PORT/DB")
