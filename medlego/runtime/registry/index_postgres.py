"""The fleet index: a PostgreSQL database shared by every replica (psycopg 3, READ COMMITTED).

Any libpq URI works: ``postgresql://USER@HOST:PORT/DB``, or a unix socket with
``postgresql://USER@/DB?host=/run/postgresql``. Each process keeps a small pool of autocommit
connections, so a read is one statement and one round trip, and a write is an explicit
transaction. The row locks in the registry's SQL are real here; what a row lock cannot cover
(that no alias and no adapter share a name, across two tables) is covered by advisory locks on
the names a transaction claims, taken in key order so that two transactions never wait on each
other in a circle. A connection that breaks (server restart, network) is dropped and the
caller gets one line; the next call connects again.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors

from ..errors import BadInputError, StorageFullError, StorageUnavailableError
from .index import Index, Tx, lock_key, redact

POOL_SIZE = 8  # connections per process: enough for a server's threads, and a fleet stays under max_connections
CONNECT_TIMEOUT_S = 5

_SCHEMA = (
    # COLLATE "C": names sort by code point, as in SQLite, whatever the database's locale
    """CREATE TABLE IF NOT EXISTS adapters (
        name TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        created TEXT NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0,
        meta TEXT NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS aliases (
        alias TEXT COLLATE "C" PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL,
        version INTEGER)""",
    "CREATE INDEX IF NOT EXISTS adapters_by_sha256 ON adapters (sha256)",
    # what listings filter on besides the name, keyset-paged by (name, version): see registry/listing.py
    """CREATE TABLE IF NOT EXISTS adapter_tags (
        kind TEXT COLLATE "C" NOT NULL,
        value TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (kind, value, name, version))""",
    "CREATE INDEX IF NOT EXISTS adapter_tags_by_adapter ON adapter_tags (name, version)",
    "CREATE INDEX IF NOT EXISTS aliases_by_name ON aliases (name)",
    # the lock row of an object (see registry.py); whoever needs a missing one creates it
    "CREATE TABLE IF NOT EXISTS objects (sha256 TEXT PRIMARY KEY)",
)
_SCHEMA_LOCK = lock_key("\0schema")  # names cannot hold NUL: never a name's key


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    return sql.replace("?", "%s")


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _unreachable(url: str, e: Exception) -> StorageUnavailableError:
    return StorageUnavailableError(f"cannot reach the registry database {redact(url)}: {_one_line(e)}")


class _Pool:
    """At most `size` connections per process, reused warmest first."""

    def __init__(self, connect, size: int):
        self._connect, self._size = connect, size
        self._inherited: list = []
        self._reset()

    def _reset(self) -> None:
        self._idle: list = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._size)
        self._pid = os.getpid()

    @contextmanager
    def connection(self):
        if self._pid != os.getpid():
            # A forked child must not use or close its parent's sessions (closing one sends the
            # server a Terminate for the parent): keep them referenced, open new ones.
            self._inherited.extend(self._idle)
            self._reset()
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                if conn.closed or conn.broken or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.close()
                else:
                    with self._lock:
                        self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresIndex(Index):
    retryable = (pg_errors.UniqueViolation, pg_errors.DeadlockDetected, pg_errors.SerializationFailure)

    def __init__(self, url: str):
        self.url = url
        self._pool = _Pool(self._connect, POOL_SIZE)
        self.write(self._create_schema)

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.OperationalError as e:  # refused, timed out, authentication failed
            raise _unreachable(self.url, e) from None
        except psycopg.Error as e:  # libpq cannot parse the URL
            raise BadInputError(f"bad registry URL {redact(self.url)!r}: {_one_line(e)}") from None

    @staticmethod
    def _create_schema(tx: Tx) -> None:
        # replicas starting at once: concurrent CREATE … IF NOT EXISTS can still collide in the catalog
        tx.run("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA:
            tx.run(statement)

    @contextmanager
    def _errors(self, conn: psycopg.Connection):
        try:
            yield
        except self.retryable:
            raise
        except pg_errors.DiskFull as e:  # SQLSTATE 53100: the server's disk; the transaction was rolled back
            raise StorageFullError(f"the registry database {redact(self.url)} has no space left: {_one_line(e)}; "
                                   "nothing was written") from None
        except psycopg.OperationalError as e:
            if conn.closed or conn.broken:
                raise _unreachable(self.url, e) from None
            raise

    def read(self, sql: str, params=()) -> list[tuple]:
        with self._pool.connection() as conn, self._errors(conn):
            return conn.execute(_pg_sql(sql), params).fetchall()

    @contextmanager
    def _transaction(self):
        with self._pool.connection() as conn, self._errors(conn), conn.transaction():
            yield Tx(lambda sql, params: conn.execute(_pg_sql(sql), params), functools.partial(_lock_names, conn))

    def close(self) -> None:
        self._pool.close()


def _lock_names(conn: psycopg.Connection, shared=(), exclusive=()) -> None:
    """Transaction-scoped advisory locks on names, in key order (so never a deadlock between two)."""
    keys = {lock_key(n): False for n in shared}
    keys.update({lock_key(n): True for n in exclusive})
    for key, excl in sorted(keys.items()):
        conn.execute("SELECT pg_advisory_xact_lock(%s)" if excl else "SELECT pg_advisory_xact_lock_shared(%s)", (key,))
