"""The embedded server: REST (uvicorn) and gRPC (grpc.aio) in one process, on one event loop.

Both listen at once; the engine warms up in a worker thread meanwhile, and readiness
(``/readyz`` 200, gRPC health SERVING) flips only when it is done. ``start()`` runs everything on
a background thread (tests, ``medlego demo``); ``run()`` blocks in the foreground until SIGINT
or SIGTERM (``medlego serve``). Ports may be 0: the bound ports are in ``.port`` / ``.grpc_port``.
Connections are guarded as :mod:`.http_guard` describes (header deadline, body rate, cap, TCP_NODELAY).
A server listening beyond loopback with no diagnosis token logs one warning line at start-up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import threading

import uvicorn

from medlego.runtime.config import API_TOKEN_ENV, ServerConfig

from .app import create_app
from .grpc_service import build_grpc_server, set_serving
from .heap import freeze_startup_heap
from .http_guard import connection_cap, guarded_protocol, quiet_exception_handler
from .service import DiagnosisService

log = logging.getLogger("medlego.serving")
_DEFAULTS = ServerConfig()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for TCP-protocol sockets
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is reachable from this machine only."""
    if host.strip().lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def open_on_network(host: str, auth) -> str | None:
    """The one start-up warning line when the diagnosis API listens beyond loopback with no token (None: fine).
    `auth`: an :class:`~.auth.Auth` or the ``[auth]`` settings (:class:`AuthConfig`)."""
    if is_loopback(host) or any(getattr(auth, k, None) for k in ("api_token", "callers", "tokens_file")):
        return None
    return (f"listening on {host} with no diagnosis token: anyone who can reach this address may diagnose, "
            f"list and describe adapters and read /metrics; set {API_TOKEN_ENV} (or [auth] api_token_file, "
            f"or named callers in [auth] tokens_file) to require a token")


class EmbeddedServer:
    def __init__(self, service: DiagnosisService, host: str = _DEFAULTS.host, port: int = _DEFAULTS.port,
                 grpc_port: int | None = _DEFAULTS.grpc_port, log_level: str = "warning", warmup: bool = True,
                 guard: ServerConfig | None = None):
        """``guard``: header timeout, keep-alive and connection cap (its other fields are not used here)."""
        self.service = service
        self.host = host
        self.port = port
        self.grpc_port = grpc_port
        self.log_level = log_level
        self.warmup = warmup
        self.guard = guard or ServerConfig()
        self.app = create_app(service)
        self._uvicorn: uvicorn.Server | None = None
        self._grpc = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._owns_process = False  # run(): this process is the server, and its startup heap is frozen
        self.ready = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc_port is None else f"{self.host}:{self.grpc_port}"

    async def serve(self) -> None:
        """Bind both servers, warm up, serve until stopped."""
        self._loop = asyncio.get_running_loop()
        quiet_exception_handler(self._loop)
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        health = None
        if self.grpc_port is not None:
            self._grpc, self.grpc_port, health = build_grpc_server(self.service, self.host, self.grpc_port)
            await set_serving(health, False)
            await self._grpc.start()
        g = self.guard
        protocol = guarded_protocol(g.header_timeout_s, connection_cap(g.max_connections),
                                    self.service.engine.counters, body_grace_s=g.body_grace_s,
                                    min_body_rate=g.min_body_rate)
        warning = open_on_network(self.host, self.service.auth)
        if warning:
            log.warning(warning)
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="off", access_log=False,
                                timeout_keep_alive=g.keep_alive_s, server_header=False, http=protocol)
        self._uvicorn = uvicorn.Server(config)
        self._bound.set()

        async def warm():
            if self.warmup:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.service.warmup)
                except Exception as e:  # stay alive but not ready: /readyz keeps saying 503
                    log.exception("warm-up failed; the server stays not ready")
                    self._error = e  # start() raises it; run() keeps serving health and metrics
                    self.ready.set()
                    return
            if self._owns_process:
                log.info("startup heap frozen: %d objects out of full collections", freeze_startup_heap())
            if health is not None:
                await set_serving(health, True)
            self.ready.set()
            log.info("ready: REST %s, gRPC %s", self.url, self.grpc_target)

        warm_task = asyncio.ensure_future(warm())
        try:
            await self._uvicorn.serve(sockets=[sock])
        finally:
            warm_task.cancel()
            if self._grpc is not None:
                await self._grpc.stop(grace=2.0)
            sock.close()

    # -- background mode -----------------------------------------------------------------------
    def start(self, timeout: float = 120.0, wait_ready: bool = True) -> "EmbeddedServer":
        def target():
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # surface bind errors to the starting thread
                self._error = e
                self._bound.set()
                self.ready.set()

        self._thread = threading.Thread(target=target, name="medlego-server", daemon=True)
        self._thread.start()
        self._bound.wait(timeout)
        if wait_ready:
            self.ready.wait(timeout)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.service.close()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- foreground mode ------------------------------------------------------------------------
    def run(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM, then shut down gracefully and return.

        uvicorn catches the signal, drains, and re-raises it once it is done; the no-op handlers
        installed here make that re-raise a normal return (exit status 0) instead of a kill."""
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._owns_process = True
        try:
            asyncio.run(self.serve())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.service.close()

