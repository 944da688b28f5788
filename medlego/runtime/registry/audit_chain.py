"""The audit chain's arithmetic and its table: canonical bodies, row hashes, the schema, appending
rows in a transaction and reading them back in pages (the design: :mod:`.audit`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timezone

from ..errors import BadInputError

GENESIS = "0" * 64
KINDS = ("diagnosis", "refused", "admin", "prune")
COLUMNS = ("time", "kind", "caller", "adapter", "image_sha256")  # copies of body fields, checked by verify
PAGE_ROWS = 20000  # rows per keyset page when streaming (bounded memory whatever the log's size)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        seq BIGINT PRIMARY KEY,
        time TEXT NOT NULL,
        kind TEXT NOT NULL,
        caller TEXT NOT NULL,
        adapter TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        body TEXT NOT NULL,
        prev TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time)",
)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, what: str) -> str:
    """An ISO date or date-time as the log's UTC text form (comparable as strings), or a one-line error."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise BadInputError(f"{what} {text!r} is not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch_seconds(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError, TypeError):
        return 0.0


def canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def row_hash(prev: str, seq: int, body: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{body}".encode()).hexdigest()


def columns_of(body: dict) -> tuple[str, str, str, str, str]:
    """The indexed columns as the body defines them (what every write stores, and verify expects)."""
    return (str(body.get("time") or ""), str(body.get("kind") or ""), str(body.get("caller") or ""),
            str(body.get("adapter") or ""), str(body.get("image_sha256") or ""))


def ensure_schema(index) -> None:
    def create(tx):
        for statement in _SCHEMA:
            tx.run(statement)
    index.write(create)


def lock_chain(tx) -> None:
    tx.lock_names((), ("\0audit",))  # PostgreSQL: one appender at a time; SQLite: BEGIN IMMEDIATE already


def append_rows(tx, bodies: list[dict], after: tuple[int, str] | None = None) -> tuple[int, str]:
    """Chain `bodies` after the last row (or after `after` = (seq, hash)), in this transaction;
    the last (seq, hash) written."""
    lock_chain(tx)
    if after is None:
        last = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1 FOR UPDATE")
        after = (last[0], last[1]) if last else (0, GENESIS)
    seq, prev = after
    for b in bodies:
        seq += 1
        text = canonical(b)
        h = row_hash(prev, seq, text)
        tx.run("INSERT INTO audit (seq, time, kind, caller, adapter, image_sha256, body, prev, hash) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (seq, *columns_of(b), text, prev, h))
        prev = h
    return seq, prev


def iter_rows(index, columns: str = "seq, body, hash", where: str = "", params: tuple = (), after: int = 0,
              page: int = PAGE_ROWS) -> Iterator[tuple]:
    """Rows oldest first, read in keyset pages of `page` rows (seq must be the first column)."""
    cond = f" AND ({where})" if where else ""
    while True:
        rows = index.read(f"SELECT {columns} FROM audit WHERE seq > ?{cond} ORDER BY seq LIMIT {int(page)}",
                          (after, *params))
        if not rows:
            return
        yield from rows
        after = rows[-1][0]
        if len(rows) < page:
            return


def append_now(index, body: dict) -> int:
    """Write one row at once (the CLI's own records)."""
    ensure_schema(index)
    return index.write(lambda tx: append_rows(tx, [{"time": now_iso(), **body}]))[0]
