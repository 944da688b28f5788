"""The audit trail: an append-only, hash-chained log of every diagnosis, refusal and admin operation.

It lives in the registry's own database (``audit`` table, SQLite or PostgreSQL). Each row holds
its content as canonical JSON (``body``) and ``hash = sha256(prev_hash + "\\n" + seq + "\\n" + body)``,
where ``prev_hash`` is the hash of the row before it (:data:`GENESIS` for the first). Changing a
row's content breaks its own hash; removing or reordering rows breaks the next row's ``prev`` or
the run of ``seq``. The indexed columns (``time``, ``kind``, ``caller``, ``adapter``,
``image_sha256``) that filters read are copies of body fields: :func:`verify` recomputes each
from the hashed body and names the row whose columns disagree, and :func:`query` re-checks every
filter against the body, so a row an edited column smuggles into a filter is not returned.

**Anchored outside the database.** With ``[audit] signing_key`` (an Ed25519 private key made by
``medlego audit keygen``), the server signs a *checkpoint* (last seq, its hash, time) every
``checkpoint_rows`` rows or ``checkpoint_interval_s`` seconds and when it closes, and writes it to
the registry's object store (``checkpoints/`` in the folder store or under the S3 prefix) and to
the server log. ``verify(public_key=…)`` checks the chain against every checkpoint: a checkpointed
row that is gone (truncation), a checkpointed hash that differs (a rewritten chain), a prune marker
without a valid signature (forged), and rows after the last checkpoint older than a grace period
(appended behind the server's back) are each reported with the row named.

Writes are off the request path: :meth:`AuditLog.record` appends to a bounded in-memory buffer
(``max_buffer`` rows) and never waits: when the buffer is full (the database is down or too slow)
it raises :class:`OverloadedError` (the request is answered 503: nothing is served unrecorded).
Refusals never raise: identical ones (same caller, API, action, stage and reason) within
``aggregate_interval_s`` are written as the first row plus one row counting the rest, so an
anonymous 401 flood costs two rows per interval, not one per request. A background thread writes
the buffer in one transaction every ``flush_interval_s`` (or sooner once ``batch_rows`` wait). A
``kill -9`` therefore loses at most the rows still in the buffer; what was written is complete,
committed transactions, so the chain on disk still verifies.

Pruning (:func:`prune`) deletes rows older than a date and appends a ``prune`` marker row that
records the first kept row's ``seq`` and ``prev`` hash (the anchor), signed with the audit key when
one is given. The marker continues the chain: it follows the last kept row, or (everything
pruned) takes the seq after the last removed row with the anchor as its ``prev``, so the chain
verifies for any cut-off date. Image content is never stored: only the sha256 of the bytes as received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..config import AuditConfig
from ..errors import BadInputError, OverloadedError

log = logging.getLogger("medlego.audit")

GENESIS = "0" * 64
KINDS = ("diagnosis", "refused", "admin", "prune")
COLUMNS = ("time", "kind", "caller", "adapter", "image_sha256")  # copies of body fields, checked by verify
PAGE_ROWS = 20000  # rows per keyset page when streaming (bounded memory whatever the log's size)
MAX_AGGREGATES = 1024  # distinct refusal kinds counted per interval; beyond, they share one "other" row

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
# A recorder sets "audited" on it once the request has its row, so the transports' error handlers
# (which record refusals no other stage saw: body limit, parse errors) never record it twice.
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


def _epoch(iso: str) -> float:
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


def _lock(tx) -> None:
    tx.lock_names((), ("\0audit",))  # PostgreSQL: one appender at a time; SQLite: BEGIN IMMEDIATE already


def _append(tx, bodies: list[dict], after: tuple[int, str] | None = None) -> tuple[int, str]:
    """Chain `bodies` after the last row (or after `after` = (seq, hash)), in this transaction;
    the last (seq, hash) written."""
    _lock(tx)
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


# -- signatures (Ed25519, from the `cryptography` package) -----------------------------------------
def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BadInputError("signed audit checkpoints need the 'cryptography' package (pip install cryptography)") from None
    return ed25519, serialization, InvalidSignature


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _signed_text(doc: dict) -> bytes:
    return canonical({k: v for k, v in doc.items() if k != "signature"}).encode()


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None) -> tuple[Path, Path, str]:
    """Write a fresh Ed25519 key pair: the private key (PKCS#8 PEM, mode 0600) and the public key
    (PEM) beside it (``FILE.pub``). Refuses to overwrite either file. (private, public, key id)."""
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path).expanduser()
    public_path = Path(public_path).expanduser() if public_path else private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise BadInputError(f"{p} already exists: keygen never overwrites a key (remove it or choose another name)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private_path, 0o600)
    pub = key.public_key()
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_path, public_path, _key_id(raw)


class Signer:
    """Signs checkpoints and prune markers with the audit's Ed25519 private key."""

    def __init__(self, key):
        _, serialization, _ = _crypto()
        self._key = key
        self.key_id = _key_id(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Signer":
        ed25519, serialization, _ = _crypto()
        p = Path(path).expanduser()
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except ValueError as e:
            raise BadInputError(f"audit signing key {p} is not a PEM private key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise BadInputError(f"audit signing key {p} is not an Ed25519 key (make one with `medlego audit keygen`)")
        return cls(key)

    def sign(self, doc: dict) -> dict:
        out = {**doc, "key_id": self.key_id}
        out["signature"] = base64.b64encode(self._key.sign(_signed_text(out))).decode()
        return out


class PublicKey:
    def __init__(self, key):
        _, serialization, self._invalid = _crypto()
        self._key = key
        self.key_id = _key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PublicKey":
        ed25519, serialization, _ = _crypto()
        p = Path(path).expanduser()
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except ValueError as e:
            raise BadInputError(f"audit public key {p} is not a PEM public key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BadInputError(f"audit public key {p} is not an Ed25519 key")
        return cls(key)

    def valid(self, doc: dict) -> bool:
        sig = doc.get("signature")
        if not isinstance(sig, str) or doc.get("key_id") != self.key_id:
            return False
        try:
            self._key.verify(base64.b64decode(sig, validate=True), _signed_text(doc))
        except (self._invalid, ValueError):
            return False
        return True


CHECKPOINT_PREFIX = "checkpoints/"


def checkpoint_name(seq: int) -> str:
    return f"{seq:020d}.json"


def write_checkpoint(store, signer: Signer, seq: int, h: str) -> dict:
    """Sign (seq, hash, now) and write it to the store's checkpoints and the log."""
    cp = signer.sign({"seq": seq, "hash": h, "time": now_iso()})
    text = canonical(cp)
    if store is not None:
        store.put_checkpoint(checkpoint_name(seq), text.encode())
    log.info("audit checkpoint %s", text)
    return cp


def read_checkpoints(store) -> list[tuple[str, dict | None]]:
    """(name, document or None when it is not JSON) of every checkpoint in the store."""
    out = []
    for name, data in store.checkpoints():
        try:
            doc = json.loads(data)
            out.append((name, doc if isinstance(doc, dict) else None))
        except ValueError:
            out.append((name, None))
    return out


# -- the writer --------------------------------------------------------------------------------------
@dataclass
class _Aggregate:
    body: dict
    first: float
    count: int = 0  # repeats after the first row (the first is written at once)
    request_ids: list = field(default_factory=list)


class AuditLog:
    def __init__(self, index, settings: AuditConfig | None = None, store=None, signer: Signer | None = None):
        self.index = index
        self.settings = settings or AuditConfig()
        self.store = store  # where signed checkpoints go (the registry's object store)
        key = getattr(self.settings, "signing_key", None)
        self.signer = signer or (Signer.from_file(key) if key else None)
        ensure_schema(index)
        self._buffer: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self._flush_lock = threading.Lock()
        self._writing = 0  # rows taken from the buffer, not yet committed
        self._aggregates: dict[tuple, _Aggregate] = {}
        self._head: tuple[int, str] | None = None  # the last (seq, hash) this writer committed
        self._checkpointed = 0  # the seq of the last checkpoint written
        self._checkpoint_at = time.monotonic()
        self.written = 0
        self.flush_errors = 0
        self.refused_full = 0  # rows refused (503) because the buffer was full
        self._thread = threading.Thread(target=self._run, name="medlego-audit", daemon=True)
        self._thread.start()

    # -- request path (never waits) -------------------------------------------------------------
    @property
    def full(self) -> bool:
        return len(self._buffer) + self._writing >= self.settings.max_buffer

    def check_room(self) -> None:
        """503 now, before the work, when a row could not be recorded."""
        if self.full and not self._closed:
            self.refused_full += 1
            raise OverloadedError("the audit trail cannot keep up (its database is slow or unreachable); "
                                  "retry later")

    def record(self, kind: str, admitted: bool = False, **fields) -> None:
        """Hand one row to the writer. Never waits: a full buffer raises OverloadedError (503), unless
        the work is `admitted` (done after check_room() passed: the overshoot is bounded by the
        requests in flight); a refusal is never refused itself (see refusal())."""
        if kind == "refused":
            self.refusal(aggregate=False, **fields)
            return
        body = {"time": now_iso(), "kind": kind, **fields}
        with self._cond:
            if not admitted and len(self._buffer) + self._writing >= self.settings.max_buffer and not self._closed:
                self.refused_full += 1
                raise OverloadedError("the audit trail cannot keep up (its database is slow or unreachable); "
                                      "retry later")
            self._buffer.append(body)
            if len(self._buffer) >= self.settings.batch_rows:
                self._cond.notify_all()
        _mark_audited()

    def refusal(self, aggregate: bool = True, **fields) -> None:
        """Record a refused request. Identical refusals (``aggregate``: all fields but the request id)
        within ``aggregate_interval_s`` are one row plus a count row; a full buffer counts it instead."""
        body = {"time": now_iso(), "kind": "refused", **fields}
        rid = body.pop("request_id", None)
        key = tuple(sorted((k, repr(v)) for k, v in body.items() if k not in ("time", "latency_ms")))
        with self._cond:
            room = len(self._buffer) + self._writing < self.settings.max_buffer or self._closed
            agg = self._aggregates.get(key) if aggregate or not room else None
            if agg is None and room:
                self._buffer.append({**body, **({"request_id": rid} if rid else {})})
                if aggregate:
                    self._aggregates[key] = _Aggregate(body, time.monotonic())
            else:  # a repeat within the interval, or no room: counted, written at the interval's end
                if agg is None:
                    if len(self._aggregates) >= MAX_AGGREGATES:
                        body = {"time": body["time"], "kind": "refused", "caller": "", "api": body.get("api", ""),
                                "reason": "other refusals (too many distinct kinds to count each)",
                                "outcome": "refused"}
                        key = ("\0other",)
                    agg = self._aggregates.setdefault(key, _Aggregate(body, time.monotonic()))
                agg.count += 1
                if rid and len(agg.request_ids) < 10:
                    agg.request_ids.append(rid)
        _mark_audited()

    def _due_aggregates(self, everything: bool) -> list[dict]:
        """Count rows of the intervals that ended (all of them when `everything`); called under _cond."""
        now, out = time.monotonic(), []
        for key, agg in list(self._aggregates.items()):
            if everything or now - agg.first >= self.settings.aggregate_interval_s:
                del self._aggregates[key]
                if agg.count:
                    out.append({**agg.body, "time": now_iso(), "first_time": agg.body["time"], "repeated": agg.count,
                                "interval_s": round(now - agg.first, 3), "request_ids": agg.request_ids})
        return out

    # -- the flusher ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if len(self._buffer) < self.settings.batch_rows and not self._closed:
                    self._cond.wait(self.settings.flush_interval_s)
                if self._closed and not self._buffer:
                    return
            self.flush(everything=False)
            self._maybe_checkpoint(False)

    def flush(self, everything: bool = True) -> None:
        """Write what is buffered; returns once everything recorded before the call is in the database
        (with `everything`, refusal counts of unfinished intervals too)."""
        with self._flush_lock:  # one writer at a time, so a caller's flush also waits for the flusher's
            self._flush(everything)

    def _flush(self, everything: bool) -> None:
        with self._cond:
            batch, self._buffer = self._buffer, []
            batch += self._due_aggregates(everything)
            self._writing = len(batch)
        if not batch:
            return
        try:
            self._head = self.index.write(lambda tx: _append(tx, batch))
            self.written += len(batch)
            with self._cond:
                self._writing = 0
                self._cond.notify_all()
        except Exception as e:  # the database is unreachable: keep the rows (bounded) and retry
            self.flush_errors += 1
            log.error("audit write failed (%d rows kept for retry): %s", len(batch), e)
            with self._cond:
                self._buffer[:0] = batch
                self._writing = 0  # back in the buffer: counted once, not twice while the flusher sleeps
                self._cond.notify_all()
            time.sleep(self.settings.flush_interval_s)

    def _maybe_checkpoint(self, final: bool) -> None:
        if self.signer is None or self._head is None or self._head[0] == self._checkpointed:
            return
        s = self.settings
        due = (final or self._head[0] - self._checkpointed >= s.checkpoint_rows
               or time.monotonic() - self._checkpoint_at >= s.checkpoint_interval_s)
        if not due:
            return
        seq, h = self._head
        try:
            write_checkpoint(self.store, self.signer, seq, h)
            self._checkpointed = seq
        except Exception as e:  # the store is down: the next round tries again
            log.error("audit checkpoint of row %d not written: %s", seq, e)
        self._checkpoint_at = time.monotonic()

    def checkpoint(self) -> None:
        """Write what is buffered and a checkpoint of the head now (when a signing key is set)."""
        self.flush()
        self._maybe_checkpoint(True)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(30)
        self.flush()
        self._maybe_checkpoint(True)

    @property
    def pending(self) -> int:
        return len(self._buffer)


def _mark_audited() -> None:
    current = CURRENT.get()
    if current is not None:
        current["audited"] = True


# -- reading, verifying, exporting, pruning ---------------------------------------------------------
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


def iter_query(index, *, since: str | None = None, until: str | None = None, adapter: str | None = None,
               caller: str | None = None, image_sha256: str | None = None, kind: str | None = None,
               limit: int | None = None, after_seq: int = 0) -> Iterator[dict]:
    """Rows matching every given filter, oldest first, streamed. `adapter` matches NAME or NAME@VERSION.
    The SQL narrows on the indexed columns; every filter is then checked again on the hashed body."""
    where, params = [], []
    since_t = parse_time(since, "since") if since else None
    until_t = parse_time(until, "until") if until else None
    if since_t:
        where.append("time >= ?")
        params.append(since_t)
    if until_t:
        where.append("time < ?")
        params.append(until_t)
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
        image_sha256 = image_sha256.lower()
        where.append("image_sha256 = ?")
        params.append(image_sha256)
    if kind:
        where.append("kind = ?")
        params.append(kind)

    def matches(b: dict) -> bool:
        t, k, c, a, img = columns_of(b)
        return ((not since_t or t >= since_t) and (not until_t or t < until_t)
                and (not adapter or a == adapter or ("@" not in adapter and a.startswith(adapter + "@")))
                and (not caller or c == caller) and (not image_sha256 or img == image_sha256)
                and (not kind or k == kind))

    n = 0
    page = PAGE_ROWS if limit is None else max(1, min(PAGE_ROWS, int(limit)))
    for seq, body, h in iter_rows(index, "seq, body, hash", " AND ".join(where), tuple(params), after_seq, page):
        b = json.loads(body)
        if not matches(b):
            continue  # an edited column: the body (what the hash covers) decides, and verify names the row
        yield {"seq": seq, **b, "hash": h}
        n += 1
        if limit is not None and n >= limit:
            return


def query(index, **filters) -> list[dict]:
    """:func:`iter_query` as a list (bounded callers: give `limit`)."""
    return list(iter_query(index, **filters))


_SQLITE_COLUMNS_MATCH = ("CASE WHEN json_valid(body) AND json_type(body) = 'object' THEN (" + " AND ".join(
    f"{c} IS coalesce(json_extract(body, '$.{c}'), '')" for c in COLUMNS) + ") ELSE 0 END")


@dataclass
class VerifyResult:
    ok: bool
    rows: int
    problem: str = ""
    seq: int | None = None  # the row named: the first that does not fit
    checkpoints: int = 0  # signed checkpoints checked
    notes: list = field(default_factory=list)


def verify(index, *, public_key: PublicKey | None = None, store=None, grace_s: float = 120.0,
           progress: Callable[[int], None] | None = None, page: int = PAGE_ROWS) -> VerifyResult:
    """Walk the chain in pages (bounded memory), checking for every row its seq, prev, hash, and its
    indexed columns against its body. With `public_key`, also every prune marker's signature and
    every signed checkpoint in `store`. The first problem is returned, with the row named."""
    ensure_schema(index)
    checkpoints: dict[int, dict] = {}
    if public_key is not None and store is not None:
        for name, doc in read_checkpoints(store):
            if doc is None or not public_key.valid(doc) or not isinstance(doc.get("seq"), int):
                seq = doc.get("seq") if isinstance(doc, dict) else None
                return VerifyResult(False, 0, f"checkpoint {name} is not signed by this key (forged or altered)",
                                    seq if isinstance(seq, int) else None)
            checkpoints[doc["seq"]] = doc
    n = 0
    first: tuple[int, str] | None = None
    expected_seq, expected_prev = 0, ""
    marker: tuple[int, dict] | None = None  # the latest prune marker (by its body)
    last_seq, last_time = 0, ""
    loads, sha = json.loads, hashlib.sha256
    # SQLite checks each row's columns against its body in C (json_extract); a row it flags, and every
    # row on other databases, is checked here in Python, which alone decides
    fast = type(index).__name__ == "SqliteIndex"
    cols_sql = "seq, body, prev, hash, kind, " + (_SQLITE_COLUMNS_MATCH if fast else "0") + \
        ", time, caller, adapter, image_sha256"
    for seq, body, prev, h, k, matched, t, c, a, img in iter_rows(index, cols_sql, page=page):
        if first is None:
            first = (seq, prev)
        elif seq != expected_seq:
            what = "removed" if seq > expected_seq else "reordered or duplicated"
            return VerifyResult(False, n, f"row {expected_seq} is missing (rows {what}): next row is {seq}", expected_seq)
        elif prev != expected_prev:
            return VerifyResult(False, n, f"row {seq} does not follow row {seq - 1} (removed or reordered rows)", seq)
        if sha(f"{prev}\n{seq}\n{body}".encode()).hexdigest() != h:
            return VerifyResult(False, n, f"row {seq} was altered: its content does not match its hash", seq)
        if not matched or k == "prune":
            try:
                b = loads(body)
            except ValueError:
                return VerifyResult(False, n, f"row {seq} was altered: its content is not JSON", seq)
            if not isinstance(b, dict):
                return VerifyResult(False, n, f"row {seq} was altered: its content is not a JSON object", seq)
            cols = columns_of(b)
            if cols != (t, k, c, a, img):
                name, stored, hashed = next((name, x, y) for name, x, y in zip(COLUMNS, (t, k, c, a, img), cols)
                                            if x != y)
                return VerifyResult(False, n, f"row {seq} was altered: its column {name} says {stored!r} but its "
                                              f"hashed content says {hashed!r}", seq)
        if k == "prune":
            if public_key is not None and not public_key.valid(b):
                return VerifyResult(False, n, f"row {seq} is a prune marker not signed by the audit key (forged)", seq)
            marker = (seq, b)
        cp = checkpoints.get(seq)
        if cp is not None and cp.get("hash") != h:
            return VerifyResult(False, n, f"row {seq} differs from the checkpoint signed at {cp.get('time')}: the "
                                          f"chain was rewritten", seq)
        expected_seq, expected_prev = seq + 1, h
        last_seq, last_time = seq, t
        n += 1
        if progress is not None and n % 65536 == 0:
            progress(65536)
    if progress is not None:
        progress(n % 65536)
    result = VerifyResult(True, n, checkpoints=len(checkpoints))
    # where the chain may start: the genesis, or the anchor the latest prune marker records
    if first is not None and first != (1, GENESIS):
        if marker is None or (marker[1].get("kept_from_seq"), marker[1].get("anchor")) != first:
            return VerifyResult(False, n, f"row {first[0]} starts the chain, but no prune marker says so: the rows "
                                          f"before it were removed", first[0])
    start = first[0] if first is not None else (marker[1]["kept_from_seq"] if marker else 1)
    for seq in sorted(checkpoints):
        cp = checkpoints[seq]
        if seq > last_seq:
            return VerifyResult(False, n, f"row {seq} is gone: the checkpoint signed at {cp.get('time')} covers rows "
                                          f"up to {seq}, the log ends at row {last_seq} (its tail was truncated)", seq)
        if seq < start:
            kept_from = marker[1].get("kept_from_seq", 0) if marker else 0
            if marker is None or kept_from <= seq:
                return VerifyResult(False, n, f"row {seq} is gone: it is checkpointed, and no signed prune marker "
                                              f"removed it", seq)
            if seq == kept_from - 1 and marker[1].get("anchor") != cp.get("hash"):
                return VerifyResult(False, n, f"row {seq} differs from the checkpoint signed at {cp.get('time')}: "
                                              f"the prune marker's anchor does not match", marker[0])
    if public_key is not None and n:
        covered = max(checkpoints) if checkpoints else 0
        if last_seq > covered:
            age = time.time() - _epoch(last_time)
            if age > grace_s or age < -grace_s:
                bad = max(covered + 1, start)
                return VerifyResult(False, n, f"row {bad} (and the {last_seq - bad} after it) is not covered by any "
                                              f"signed checkpoint and is older than {grace_s:g} s: appended behind the "
                                              f"server's back, or left by a crash before its checkpoint", bad,
                                    checkpoints=len(checkpoints))
            result.notes.append(f"rows {max(covered + 1, start)}-{last_seq} are newer than the last checkpoint "
                                f"(written in the last {grace_s:g} s)")
    return result


def append_now(index, body: dict) -> int:
    """Write one row at once (the CLI's own records)."""
    ensure_schema(index)
    return index.write(lambda tx: _append(tx, [{"time": now_iso(), **body}]))[0]


def prune(index, before: str, caller: str = "cli", signer: Signer | None = None, store=None) -> dict:
    """Delete rows older than `before` and chain a marker row naming the new start of the chain
    (signed, and checkpointed in `store`, when `signer` is given)."""
    ensure_schema(index)
    cutoff = parse_time(before, "--before")

    def run(tx):
        _lock(tx)
        last = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1 FOR UPDATE")
        if last is None:
            return {"removed": 0}
        kept = tx.one("SELECT seq, prev FROM audit WHERE time >= ? ORDER BY seq LIMIT 1", (cutoff,))
        # rows from the first one at/after the cutoff on are kept (a prune never makes a hole mid-chain)
        kept_from, anchor = kept if kept is not None else (last[0] + 1, last[1])
        removed = tx.run("DELETE FROM audit WHERE seq < ?", (kept_from,))
        marker = {"time": now_iso(), "kind": "prune", "caller": caller, "before": cutoff, "removed": removed,
                  "kept_from_seq": kept_from, "anchor": anchor}
        if signer is not None:
            marker = signer.sign(marker)
        if removed:
            # after the last kept row; everything pruned: the marker itself starts the chain at kept_from
            seq, h = _append(tx, [marker], after=(last[0], last[1]) if kept is not None else (kept_from - 1, anchor))
            marker = {**marker, "seq": seq, "hash": h}
        return marker
    marker = index.write(run)
    if marker.get("removed") and signer is not None:
        write_checkpoint(store, signer, marker["seq"], marker["hash"])
    return marker
