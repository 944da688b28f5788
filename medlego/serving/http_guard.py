"""Connection-level protection of the HTTP server: header deadline, connection cap, quiet accept errors.

uvicorn (h11) waits forever for a connection's first request headers, accepts every connection
it is offered, and asyncio logs a traceback for every failed ``accept()``: 1,100 connections that
never finished their headers exhausted the descriptors, normal requests timed out, and about
1.1 M "Too many open files" tracebacks were logged in 45 s. Here:

* a connection must finish each request's headers within ``header_timeout_s`` of connecting (or
  of its first byte after a keep-alive pause), and a request body that stops arriving for that
  long is cut off too, else one slow client holds a connection for ever;
* a request body must also keep an average of ``min_body_rate`` bytes per second once
  ``body_grace_s`` have passed since its headers (time while the app is not reading does not
  count): a body trickling one byte every few seconds, which restarts the stall deadline above
  with every byte, is cut off after the grace period (issue 24: 1,000 such bodies held every
  connection slot for 40 s);
* at most ``max_connections`` are open; one more takes the place of (in this order) the oldest
  connection that never completed a request and waits for headers, the slowest request body
  below ``min_body_rate``, the oldest idle keep-alive connection, the slowest other body (so slow
  clients cannot hold places new clients need), or, when every open connection is busy with a
  request it has sent in full, is closed at once;
* the event loop logs the same error at most once per ``LOG_EVERY_S``, with a count of the rest;
* every accepted socket gets ``TCP_NODELAY`` (so does the listening one, by being created with
  ``IPPROTO_TCP``: asyncio only sets it for TCP-protocol sockets), so a keep-alive response is
  never held back by Nagle's algorithm waiting for the client's delayed ACK (~40 ms).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from medlego.runtime.counters import Counters

log = logging.getLogger("medlego.serving")

LOG_EVERY_S = 10.0
_FD_HEADROOM = 256  # descriptors kept for the registry, model files, gRPC and logs


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int) -> int:
    """The connection cap this process can honour without running out of descriptors."""
    soft = raise_fd_limit()
    cap = max(16, min(wanted, soft - _FD_HEADROOM))
    if cap < wanted:
        log.warning("max_connections %d lowered to %d: the descriptor limit is %d", wanted, cap, soft)
    return cap


class GuardedH11Protocol(H11Protocol):
    """An H11Protocol enforcing the header deadline, the body rate and the connection cap.

    The limits are class attributes so that uvicorn, which builds protocols from a class, can use
    one: :func:`guarded_protocol` makes a subclass that sets them."""

    header_timeout_s: float = 10.0
    max_connections: int = 1024
    counters: Counters
    body_grace_s: float = 5.0
    min_body_rate: float = 1024.0
    check_every_s: float = 1.0

    _header_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    _connected_at = 0.0
    _body_started: float | None = None  # when the current request's body began (its clock; paused time skipped)
    _body_bytes = 0
    _body_checked = 0.0
    _served = False  # a response was completed on this connection (a proven client)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.max_connections and not self._make_room():
            self.counters.inc("connections_refused", reason="cap")
            transport.abort()
            return
        self._connected_at = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a new request: its headers have a deadline
            self._arm_header_deadline()
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:  # a body must keep arriving: the stall deadline restarts
            self._cancel_header_deadline()
            self._arm_header_deadline()
            if self._body_started is None:
                self._start_body_clock()
            else:
                self._body_bytes += len(data)
        else:
            if self.conn.their_state is not h11.IDLE:
                self._cancel_header_deadline()
            self._stop_body_clock()

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        self._stop_body_clock()
        if self.transport is not None:  # None: refused by the cap before uvicorn saw it
            super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._served = True
        super().on_response_complete()

    # -- the body's rate --------------------------------------------------------------------
    def _start_body_clock(self) -> None:
        self._body_started = self._body_checked = time.monotonic()
        self._body_bytes = 0
        self._body_timer = self.loop.call_later(self.check_every_s, self._check_body_rate)

    def _stop_body_clock(self) -> None:
        self._body_started = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def body_rate(self, now: float) -> float:
        """Bytes per second of the body so far (over at least one second); inf when not in a body."""
        if self._body_started is None:
            return float("inf")
        return self._body_bytes / max(1.0, now - self._body_started)

    def _check_body_rate(self) -> None:
        self._body_timer = None
        if self._body_started is None or self.transport is None or self.transport.is_closing():
            return
        now = time.monotonic()
        if self.flow.read_paused:  # the app is behind, not the client: that time does not count
            self._body_started += now - self._body_checked
        elif self.conn.their_state is h11.SEND_BODY and now - self._body_started >= self.body_grace_s \
                and self._body_bytes < self.min_body_rate * (now - self._body_started):
            self.counters.inc("connections_refused", reason="body_slow")
            self._stop_body_clock()
            self.transport.abort()
            return
        self._body_checked = now
        self._body_timer = self.loop.call_later(self.check_every_s, self._check_body_rate)

    # -- the cap -----------------------------------------------------------------------------
    def _eviction_key(self, now: float) -> tuple[int, float, float] | None:
        """Where this connection stands in the order :meth:`_make_room` evicts in (lowest first);
        None when it must not be evicted (closing, or busy with a request it has sent in full)."""
        if self.transport is None or self.transport.is_closing():
            return None
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            return (2 if self._served else 0, self._connected_at, 0.0)
        if self.conn.their_state is h11.SEND_BODY and self._body_started is not None:
            rate = self.body_rate(now)
            return (1 if rate < self.min_body_rate else 3, rate, self._body_started)
        return None

    def _make_room(self) -> bool:
        """Close one connection that is not busy with a request it has sent in full, in this order:
        the oldest that never completed a request and waits for headers (slowloris), the slowest
        body below ``min_body_rate``, the oldest idle keep-alive connection of a client already
        served, the slowest other body. False if every connection is busy."""
        now, best, best_key = time.monotonic(), None, None
        for p in self.server_state.connections:
            if not isinstance(p, type(self)):
                continue
            key = p._eviction_key(now)
            if key is not None and (best_key is None or key < best_key):
                best, best_key = p, key
        if best is None or best_key is None:
            return False
        reason = "evicted_body" if best_key[0] in (1, 3) else "evicted_idle"
        self.counters.inc("connections_refused", reason=reason)
        best._stop_body_clock()
        best.transport.abort()
        self.server_state.connections.discard(best)  # its connection_lost comes on the next loop turn
        return True

    # -- the stall deadline (headers, and a body that stops) -----------------------------------
    def _arm_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self.counters.inc("connections_refused", reason="header_timeout")
            self.transport.abort()
        elif state is h11.SEND_BODY and not self.flow.read_paused:  # paused: the app is behind, not the client
            self.counters.inc("connections_refused", reason="body_timeout")
            self._stop_body_clock()
            self.transport.abort()


def guarded_protocol(header_timeout_s: float, max_connections: int, counters: Counters, *,
                     body_grace_s: float = 5.0, min_body_rate: float = 1024.0) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass enforcing these limits (one class per server)."""
    limits = {
        "header_timeout_s": header_timeout_s,
        "max_connections": max_connections,
        "counters": counters,
        "body_grace_s": body_grace_s,
        "min_body_rate": min_body_rate,
        "check_every_s": max(0.05, min(1.0, body_grace_s)),
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


def quiet_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Log each distinct loop error at most once per LOG_EVERY_S (accept() failures repeat per connection)."""
    last: dict[str, list] = {}  # message -> [last time logged, suppressed since]

    def handler(loop, context: dict) -> None:
        message = str(context.get("message", "event loop error"))
        now = time.monotonic()
        seen = last.get(message)
        if seen is not None and now - seen[0] < LOG_EVERY_S:
            seen[1] += 1
            return
        suppressed = seen[1] if seen else 0
        last[message] = [now, 0]
        exc = context.get("exception")
        log.error("%s%s%s", message, f": {exc}" if exc else "",
                  f" (and {suppressed} more in the last {LOG_EVERY_S:.0f} s)" if suppressed else "")

    loop.set_exception_handler(handler)
