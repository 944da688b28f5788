"""The HTTP middleware around every route, /v1 and /v2 alike (``create_app`` adds them, outermost
last): the body limit before any byte is read, the request id and audit context, and the recorder
of refusals no route recorded (issue 25)."""

from __future__ import annotations

import json
import uuid
from typing import Callable

from medlego.runtime.errors import PayloadTooLargeError
from medlego.runtime.registry.audit import CURRENT

from .http_errors import error_response
from .kserve_rest import v2_error
from .limits import valid_request_id


class BodyLimitMiddleware:
    """Refuse a request body above the limit with 413, before the app reads it into memory.

    A declared Content-Length above the limit is refused at once; an undeclared (chunked) body
    is counted as it streams and refused as soon as it passes the limit.
    """

    def __init__(self, app, limit_for):
        self.app = app
        self.limit_for = limit_for  # path -> max bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = PayloadTooLargeError(f"request body is above the limit of {limit} bytes")
        # /v2 answers with the Open Inference Protocol's error body
        respond = v2_error if scope.get("path", "").startswith("/v2") else error_response
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await respond(too_large)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a MedlegoError: the app's handler answers 413 when it reads the body
                    raise too_large
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except PayloadTooLargeError:
            if not started:
                await respond(too_large)(scope, receive, send)


class RequestIdMiddleware:
    """Every answer carries ``X-Request-ID``: the client's when valid (1-128 of ``A-Za-z0-9._:-``),
    else a fresh one. The id, the API and (after the token check) the caller are noted for the audit log."""

    def __init__(self, app, transport_id: Callable[[], str] | None = None):
        # transport_id: the id a proxy in front already answers with (Ray Serve's HTTP proxy sets
        # X-Request-ID itself: the client's or its own); then this layer adopts it and adds no header
        self.app = app
        self.transport_id = transport_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # the peer address: the decode pool's turn-taking key for a caller without a token (fair_pool.py)
        noted = {"api": "v2" if scope.get("path", "").startswith("/v2") else "rest",
                 "client": (scope.get("client") or ("",))[0]}
        if self.transport_id is not None:
            CURRENT.set({"id": self.transport_id() or uuid.uuid4().hex, **noted})
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if valid_request_id(given) else uuid.uuid4().hex
        CURRENT.set({"id": rid, **noted})

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class RefusalAuditMiddleware:
    """Every answer of 400 or more that no recorder saw gets its audit row (issue 25): a body over the
    limit, JSON or multipart that does not parse, a v2 tensor refused, an unknown route. It watches the
    status and the first bytes of the error body (its reason) and calls ``record(status, **fields)``
    (``DiagnosisService.refused_at``), which skips requests already recorded (diagnoses, auth
    refusals, admin operations) and aggregates identical refusals."""

    def __init__(self, app, record: Callable[..., None]):
        self.app = app
        self.record = record

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, head = 0, bytearray()

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message.get("status", 0))
            elif message["type"] == "http.response.body" and status >= 400 and len(head) < 2048:
                head.extend(message.get("body", b"")[:2048 - len(head)])
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except BaseException:
            status = status or 500
            raise
        finally:
            if status >= 400:
                self.record(status, reason=_reason(bytes(head)), method=scope.get("method", ""),
                            path=str(scope.get("path", ""))[:256])


def _reason(head: bytes) -> str:
    """The error body's one-line reason (``detail`` of /v1, ``error`` of /v2), else its first bytes."""
    try:
        doc = json.loads(head)
        text = doc.get("detail") or doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        text = None
    text = text if isinstance(text, str) else head.decode("utf-8", "replace")
    return " ".join(text.split())[:512]
