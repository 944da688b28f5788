"""The embedded index: ``<data_dir>/registry.db``, SQLite in WAL mode, one connection per thread.

Writers take the database's write lock up front (``BEGIN IMMEDIATE``), so write transactions
run one at a time across every process on the machine; readers never wait for them (WAL). The
registry's row locks (``FOR UPDATE``, ``FOR SHARE``) are therefore already implied and are
dropped from its SQL, and advisory name locks are no-ops.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import StorageFullError
from .index import Index, Tx
from .store import DISK_FULL_ERRNOS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER  -- NULL: follow the latest version of name
);
CREATE INDEX IF NOT EXISTS adapters_by_sha256 ON adapters (sha256);
-- what listings filter on besides the name, keyset-paged by (name, version): see registry/listing.py
CREATE TABLE IF NOT EXISTS adapter_tags (
    kind TEXT NOT NULL,  -- 'task' or 'base'
    value TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (kind, value, name, version)
);
CREATE INDEX IF NOT EXISTS adapter_tags_by_adapter ON adapter_tags (name, version);
CREATE INDEX IF NOT EXISTS aliases_by_name ON aliases (name);
CREATE TABLE IF NOT EXISTS objects (sha256 TEXT PRIMARY KEY)  -- an object's lock row (see registry.py)
"""


@functools.lru_cache(maxsize=256)
def _sqlite_sql(sql: str) -> str:
    return re.sub(r"\s+FOR (UPDATE|SHARE)\b", "", sql)


class SqliteIndex(Index):
    retryable = ()  # BEGIN IMMEDIATE serializes writers: no race is left for a retry to resolve

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self.write(self._create_schema)

    @staticmethod
    def _create_schema(tx: Tx) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                tx.run(statement)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (opened once: resolving is on the request path)."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # never use a connection across fork
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def read(self, sql: str, params=()) -> list[tuple]:
        return self._connection().execute(_sqlite_sql(sql), params).fetchall()

    @contextmanager
    def _transaction(self):
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield Tx(lambda sql, params: db.execute(_sqlite_sql(sql), params), lambda shared=(), exclusive=(): None)
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:  # SQLite rolls back by itself after some errors (a full disk among them)
                db.execute("ROLLBACK")
            if _disk_full(e):
                raise StorageFullError(f"no space left for the registry's database {self.path} (database or disk "
                                       "is full); nothing was written: free space and retry") from None
            raise

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
            self._local.db = None


def _disk_full(e: BaseException) -> bool:
    """SQLITE_FULL (a write that found no space), or the OS saying so directly."""
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(e)
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS
