"""Connection-level protection of the HTTP server: header deadline, connection cap, quiet accept errors.

uvicorn (h11) waits forever for a connection's first request headers, accepts every connection
it is offered, and asyncio logs a traceback for every failed ``accept()``: 1,100 connections that
never finished their headers exhausted the descriptors, normal requests timed out, and about
1.1 M "Too many open files" tracebacks were logged in 45 s. Here:

* a connection must finish each request's headers within ``header_timeout_s`` of connecting (or
  of its first byte after a keep-alive pause), and a request body that stops arriving for that
  long is cut off too, else one slow client holds a connection for ever;
* at most ``max_connections`` are open; one more takes the place of the oldest connection that
  is waiting for request headers (so a slow client cannot hold a place a new client needs), or,
  when every open connection is busy with a request, is closed at once;
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


def guarded_protocol(header_timeout_s: float, max_connections: int, counters: Counters) -> type[H11Protocol]:
    """An H11Protocol class enforcing the header deadline and the connection cap."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        _connected_at = 0.0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= max_connections and not self._make_room():
                counters.inc("connections_refused", reason="cap")
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
            if self.conn.their_state is h11.SEND_BODY:  # a body must keep arriving: the deadline restarts
                self._cancel_header_deadline()
                self._arm_header_deadline()
            elif self.conn.their_state is not h11.IDLE:
                self._cancel_header_deadline()

        def connection_lost(self, exc) -> None:
            self._cancel_header_deadline()
            if self.transport is not None:  # None: refused by the cap before uvicorn saw it
                super().connection_lost(exc)

        def _make_room(self) -> bool:
            """Close the oldest connection that is between requests (waiting for headers); False if none is."""
            idle = [p for p in self.server_state.connections
                    if isinstance(p, GuardedH11Protocol) and p.conn.their_state is h11.IDLE
                    and (p.cycle is None or p.cycle.response_complete)]
            if not idle:
                return False
            oldest = min(idle, key=lambda p: p._connected_at)
            counters.inc("connections_refused", reason="evicted_idle")
            oldest.transport.abort()
            self.server_state.connections.discard(oldest)  # its connection_lost comes on the next loop turn
            return True

        def _arm_header_deadline(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_deadline_passed)

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
                counters.inc("connections_refused", reason="header_timeout")
                self.transport.abort()
            elif state is h11.SEND_BODY and not self.flow.read_paused:  # paused: the app is behind, not the client
                counters.inc("connections_refused", reason="body_timeout")
                self.transport.abort()

    return GuardedH11Protocol


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
