"""The audit trail: an append-only, hash-chained log of every diagnosis, refusal and admin operation.

It lives in the registry's own database (``audit`` table, SQLite or PostgreSQL). Each row holds
its content as canonical JSON (``body``) and ``hash = sha256(prev_hash + "\\n" + seq + "\\n" + body)``,
where ``prev_hash`` is the hash of the row before it (:data:`GENESIS` for the first). Changing a
row's content breaks its own hash; removing or reordering rows breaks the next row's ``prev`` or
the run of ``seq``. :func:`verify` walks the chain and names the first row that does not fit.

Writes are off the request path: :meth:`AuditLog.record` appends to a bounded in-memory buffer
(``max_buffer`` rows) and a background thread writes it in one transaction every
``flush_interval_s`` (or sooner once ``batch_rows`` are waiting). When the buffer is full, a
request waits for the flusher rather than going unrecorded. :meth:`AuditLog.close` flushes what is
left. A ``kill -9`` therefore loses at most the rows still in the buffer: never more than
``max_buffer`` rows, and in steady state only those recorded in the last ``flush_interval_s``.
What was written is complete, committed transactions, so the chain on disk still verifies.

Pruning (:func:`prune`) deletes rows older than a date and appends a ``prune`` marker row that
records the first kept row's ``seq`` and ``prev`` hash (the anchor): the marker is hashed into
the chain like any row, so :func:`verify` accepts the new start of the chain only as the marker
says. Image content is never stored: only the sha256 of the bytes as received.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone

from ..config import AuditConfig
from ..errors import BadInputError

log = logging.getLogger("medlego.audit")

GENESIS = "0" * 64
KINDS = ("diagnosis", "refused", "admin", "prune")

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

# The request being served (set by the transports): its id, the caller's name and the API.
CURRENT: ContextVar[dict | None] = ContextVar("medlego_audit_request", default=None)


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


def canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def row_hash(prev: str, seq: int, body: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{body}".encode()).hexdigest()


def ensure_schema(index) -> None:
    def create(tx):
        for statement in _SCHEMA:
            tx.run(statement)
    index.write(create)


def _lock(tx) -> None:
    tx.lock_names((), ("\0audit",))  # PostgreSQL: one appender at a time; SQLite: BEGIN IMMEDIATE already


def _append(tx, bodies: list[dict]) -> int:
    """Chain `bodies` after the last row, in this transaction; the last seq written."""
    _lock(tx)
    last = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1 FOR UPDATE")
    seq, prev = (last[0], last[1]) if last else (0, GENESIS)
    for b in bodies:
        seq += 1
        text = canonical(b)
        h = row_hash(prev, seq, text)
        tx.run("INSERT INTO audit (seq, time, kind, caller, adapter, image_sha256, body, prev, hash) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (seq, b["time"], b["kind"], b.get("caller") or "", b.get("adapter") or "",
                b.get("image_sha256") or "", text, prev, h))
        prev = h
    return seq


class AuditLog:
    def __init__(self, index, settings: AuditConfig | None = None):
        self.index = index
        self.settings = settings or AuditConfig()
        ensure_schema(index)
        self._buffer: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self._flush_lock = threading.Lock()
        self._writing = 0  # rows taken from the buffer, not yet committed
        self.written = 0
        self.flush_errors = 0
        self._thread = threading.Thread(target=self._run, name="medlego-audit", daemon=True)
        self._thread.start()

    # -- request path ---------------------------------------------------------------------------
    def record(self, kind: str, **fields) -> None:
        body = {"time": now_iso(), "kind": kind, **fields}
        with self._cond:
            # rows being written count too: at most max_buffer rows are ever not yet committed
            while len(self._buffer) + self._writing >= self.settings.max_buffer and not self._closed:
                self._cond.notify_all()
                self._cond.wait(0.05)  # full: wait for the flusher, never drop a record
            self._buffer.append(body)
            if len(self._buffer) >= self.settings.batch_rows:
                self._cond.notify_all()

    # -- the flusher ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._buffer and not self._closed:
                    self._cond.wait(self.settings.flush_interval_s)
                elif len(self._buffer) < self.settings.batch_rows and not self._closed:
                    self._cond.wait(self.settings.flush_interval_s)
                if self._closed and not self._buffer:
                    return
            self.flush()

    def flush(self) -> None:
        """Write what is buffered; returns once everything recorded before the call is in the database."""
        with self._flush_lock:  # one writer at a time, so a caller's flush also waits for the flusher's
            self._flush()

    def _flush(self) -> None:
        with self._cond:
            batch, self._buffer = self._buffer, []
            self._writing = len(batch)
        if not batch:
            return
        try:
            self.index.write(lambda tx: _append(tx, batch))
            self.written += len(batch)
        except Exception as e:  # the database is unreachable: keep the rows (bounded) and retry
            self.flush_errors += 1
            log.error("audit write failed (%d rows kept for retry): %s", len(batch), e)
            with self._cond:
                self._buffer[:0] = batch
            time.sleep(self.settings.flush_interval_s)
        finally:
            with self._cond:
                self._writing = 0
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(30)
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._buffer)


# -- reading, verifying, exporting, pruning ---------------------------------------------------------
def query(index, *, since: str | None = None, until: str | None = None, adapter: str | None = None,
          caller: str | None = None, image_sha256: str | None = None, kind: str | None = None,
          limit: int | None = None) -> list[dict]:
    """Rows matching every given filter, oldest first. `adapter` matches NAME or NAME@VERSION."""
    where, params = [], []
    if since:
        where.append("time >= ?")
        params.append(parse_time(since, "since"))
    if until:
        where.append("time < ?")
        params.append(parse_time(until, "until"))
    if adapter:
        if "@" in adapter:
            where.append("adapter = ?")
            params.append(adapter)
        else:
            where.append("(adapter = ? OR adapter LIKE ?)")
            params += [adapter, adapter.replace("%", "").replace("_", "") + "@%"]
    if caller:
        where.append("caller = ?")
        params.append(caller)
    if image_sha256:
        where.append("image_sha256 = ?")
        params.append(image_sha256.lower())
    if kind:
        where.append("kind = ?")
        params.append(kind)
    sql = "SELECT seq, body, hash FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [{"seq": seq, **json.loads(body), "hash": h} for seq, body, h in index.read(sql, tuple(params))]


@dataclass
class VerifyResult:
    ok: bool
    rows: int
    problem: str = ""
    seq: int | None = None  # the first row that does not fit


def verify(index, chunk: int = 5000) -> VerifyResult:
    ensure_schema(index)
    rows = index.read("SELECT seq, body, prev, hash FROM audit ORDER BY seq")
    if not rows:
        return VerifyResult(True, 0)
    # where the chain may start: the genesis, or the anchor the latest prune marker recorded
    start_seq, start_prev = 1, GENESIS
    for seq, body, _, _ in reversed(rows):
        b = json.loads(body)
        if b.get("kind") == "prune":
            start_seq, start_prev = b["kept_from_seq"], b["anchor"]
            break
    expected_seq, expected_prev = start_seq, start_prev
    for n, (seq, body, prev, h) in enumerate(rows):
        if seq != expected_seq:
            what = "removed" if seq > expected_seq else "reordered or duplicated"
            return VerifyResult(False, n, f"row {expected_seq} is missing (rows {what}): next row is {seq}", expected_seq)
        if prev != expected_prev:
            return VerifyResult(False, n, f"row {seq} does not follow row {seq - 1} (removed or reordered rows)", seq)
        if row_hash(prev, seq, body) != h:
            return VerifyResult(False, n, f"row {seq} was altered: its content does not match its hash", seq)
        try:
            json.loads(body)
        except ValueError:
            return VerifyResult(False, n, f"row {seq} was altered: its content is not JSON", seq)
        expected_seq, expected_prev = seq + 1, h
    return VerifyResult(True, len(rows))


def append_now(index, body: dict) -> int:
    """Write one row at once (the CLI's own records, e.g. a prune marker)."""
    ensure_schema(index)
    return index.write(lambda tx: _append(tx, [{"time": now_iso(), **body}]))


def prune(index, before: str, caller: str = "cli") -> dict:
    """Delete rows older than `before` and chain a marker row naming the new start of the chain."""
    ensure_schema(index)
    cutoff = parse_time(before, "--before")

    def run(tx):
        _lock(tx)
        kept = tx.one("SELECT seq, prev FROM audit WHERE time >= ? ORDER BY seq LIMIT 1", (cutoff,))
        # rows from the first one at/after the cutoff on are kept (a prune never makes a hole mid-chain)
        if kept is None:
            last = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            if last is None:
                return {"removed": 0}
            kept_from, anchor = last[0] + 1, last[1]
        else:
            kept_from, anchor = kept
        removed = tx.run("DELETE FROM audit WHERE seq < ?", (kept_from,))
        marker = {"time": now_iso(), "kind": "prune", "caller": caller, "before": cutoff, "removed": removed,
                  "kept_from_seq": kept_from, "anchor": anchor}
        if removed:
            marker["seq"] = _append(tx, [marker])
        return marker
    return index.write(run)
