"""The audit writer: a bounded in-memory buffer the request path appends to without waiting, and
the background thread that writes it to the chain and signs checkpoints (the design: :mod:`.audit`)."""

from __future__ import annotations

import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from ..config import AuditConfig
from ..errors import OverloadedError
from .audit_chain import append_rows, ensure_schema, now_iso
from .audit_keys import Signer, write_checkpoint

log = logging.getLogger("medlego.audit")

FAILURE_LOG_INTERVAL_S = 10.0  # during an outage, one log line per this long, with a count
MAX_AGGREGATES = 1024  # distinct refusal kinds counted per interval; beyond, they share one "other" row

# The request being served (set by the transports): its id, the caller's name and the API.
# A recorder sets "audited" on it once the request has its row, so the transports' error handlers
# (which record refusals no other stage saw: body limit, parse errors) never record it twice.
CURRENT: ContextVar[dict | None] = ContextVar("medlego_audit_request", default=None)


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
        self._failing_since_log: int | None = None  # failed flushes not yet logged (None: the last one worked)
        self._failure_logged_at = 0.0
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
            self._head = self.index.write(lambda tx: append_rows(tx, batch))
            self.written += len(batch)
            if self._failing_since_log is not None:
                log.warning("audit writes work again; %d buffered rows written", len(batch))
                self._failing_since_log = None
            with self._cond:
                self._writing = 0
                self._cond.notify_all()
        except Exception as e:  # the database is unreachable: keep the rows (bounded) and retry
            self.flush_errors += 1
            self._log_failure(len(batch), e)
            with self._cond:
                self._buffer[:0] = batch
                self._writing = 0  # back in the buffer: counted once, not twice while the flusher sleeps
                self._cond.notify_all()
            time.sleep(self.settings.flush_interval_s)

    def _log_failure(self, rows: int, error: Exception) -> None:
        """The first failed flush of an outage, then one line per FAILURE_LOG_INTERVAL_S: the flusher
        retries every flush_interval_s, and an outage must not fill the log."""
        now = time.monotonic()
        if self._failing_since_log is None or now - self._failure_logged_at >= FAILURE_LOG_INTERVAL_S:
            more = f" ({self._failing_since_log + 1} failed attempts since the last line)" if self._failing_since_log else ""
            log.error("audit write failed (%d rows kept for retry)%s: %s", rows, more, error)
            self._failing_since_log, self._failure_logged_at = 0, now
        else:
            self._failing_since_log += 1

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
