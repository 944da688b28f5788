"""The REST API (FastAPI), written once against the serving contract (:class:`~.contract.DiagnosisAPI`).

Every route is a thin shell over the contract: the embedded server passes a
:class:`~.service.DiagnosisService`, the Ray ingress a :class:`~.ray_app.RayFrontend`. Errors are
:class:`MedlegoError`s answered with their class's status (``runtime/errors.py``) and
``{"detail": message, "type": ErrorClass}``; 503 adds ``Retry-After``, 401 ``WWW-Authenticate``.
The OpenAPI page is at ``/docs``; its scripts and styles are served by this app, so it works offline.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlego.runtime.registry.audit import CURRENT
from medlego.runtime.errors import BadInputError, MedlegoError, OverloadedError, PayloadTooLargeError, answer_of

from . import limits as checks
from .contract import DiagnoseItem, DiagnosisAPI, MergeSpec
from .docs_assets import add_offline_docs
from .kserve_rest import mount_kserve, v2_error
from .metrics import CONTENT_TYPE

log = logging.getLogger("medlego.serving")

MAX_AUDIT_PAGE = 1000  # rows in one GET /v1/audit answer; the next page starts after the answer's "next"

def _body(schemas: dict) -> dict:
    """An OpenAPI requestBody with one object schema per content type (FastAPI cannot infer these routes' bodies)."""
    content = {ctype: {"schema": {"type": "object", **schema}} for ctype, schema in schemas.items()}
    return {"requestBody": {"required": True, "content": content}}


_STR, _INT = {"type": "string"}, {"type": "integer", "minimum": 1}
_FILE = {"type": "string", "format": "binary"}

_DIAGNOSE_BODY = _body({
    "multipart/form-data": {"required": ["file", "adapter"], "properties": {
        "file": {**_FILE, "description": "PNG, JPEG or DICOM file"},
        "adapter": {**_STR, "description": "name, name@version or alias"},
        "task": {**_STR, "description": "needed when the adapter has several tasks"}, "top_k": _INT}},
    "application/json": {"required": ["image", "adapter"], "properties": {
        "image": {"type": "string", "format": "byte", "description": "base64 PNG/JPEG/DICOM bytes"},
        "adapter": _STR, "task": _STR, "top_k": _INT}}})

_BATCH_BODY = _body({
    "multipart/form-data": {"required": ["file", "adapter"], "properties": {
        "file": {"type": "array", "items": _FILE, "description": "one part per image"},
        "adapter": {"type": "array", "items": _STR, "description": "one adapter for every image, or one per image"},
        "task": {"type": "array", "items": _STR}, "top_k": _INT}},
    "application/json": {"required": ["items"], "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "image": {"type": "string", "format": "byte"}, "adapter": _STR, "task": _STR, "top_k": _INT}}},
        "adapter": {**_STR, "description": "default for items without one"}, "task": _STR, "top_k": _INT}}})

_ALIAS_BODY = _body({"application/json": {"required": ["target"], "properties": {
    "target": {**_STR, "description": "NAME@VERSION, or NAME to follow its latest version"}}}})

_MERGE_BODY = _body({"application/json": {"required": ["name", "sources"], "properties": {
    "name": {**_STR, "description": "name to register the merged adapter under"},
    "sources": {"type": "array", "items": _STR, "description": "registered NAME[@VERSION] or aliases"},
    "method": {**_STR, "default": "med-lego", "description": "med-lego, lora-avg, delta-avg, task-arithmetic, "
                                                             "ties, dare, magnitude-prune, pem, magmax, iso-c, tsv"},
    "params": {"type": "object", "description": "method parameters, e.g. {\"threshold\": 0.997}"},
    "aliases": {"type": "array", "items": _STR}, "task_names": {"type": "array", "items": _STR},
    "move_alias": {"type": "boolean", "description": "move an alias that points elsewhere"}}}})

_UPLOAD_BODY = _body({
    "multipart/form-data": {"required": ["file", "name"], "properties": {
        "file": {**_FILE, "description": "medlego SVD-LoRA .safetensors"}, "name": _STR,
        "alias": {"type": "array", "items": _STR},
        "move_alias": {"type": "boolean", "description": "move an alias that points elsewhere"}}}})


def error_response(e: BaseException) -> JSONResponse:
    status = answer_of(e)[0]
    if isinstance(e, MedlegoError):
        body = {"detail": str(e), "type": type(e).__name__}
    else:  # a bug, not a user mistake: log it, answer without internals
        log.error("internal error", exc_info=e)
        body = {"detail": "internal server error", "type": "InternalError"}
    headers = {}
    if isinstance(e, OverloadedError):
        headers["Retry-After"] = str(e.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


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
        if self.transport_id is not None:
            rid = self.transport_id() or uuid.uuid4().hex
            CURRENT.set({"id": rid, "api": "v2" if scope.get("path", "").startswith("/v2") else "rest"})
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if valid_request_id(given) else uuid.uuid4().hex
        CURRENT.set({"id": rid, "api": "v2" if scope.get("path", "").startswith("/v2") else "rest"})

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


def valid_request_id(value: str) -> bool:
    return 0 < len(value) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:-") for c in value)


def create_app(service: DiagnosisAPI, *, title: str = "medlego",
               transport_request_id: Callable[[], str] | None = None) -> FastAPI:
    app = FastAPI(
        title=title, version="1", docs_url=None, redoc_url=None,  # /docs: add_offline_docs below
        description="Medical image diagnosis with one frozen ViT and hot-swapped SVD-LoRA adapters. "
                    "Admin routes need `Authorization: Bearer <MEDLEGO_ADMIN_TOKEN>`; diagnosis needs "
                    "`Bearer <MEDLEGO_API_TOKEN>` when one is configured.")
    add_offline_docs(app)
    limits = service.limits
    app.state.service = service

    def limit_for(path: str) -> int:
        if path.startswith("/v1/adapters"):
            return max(limits.max_body_bytes, limits.max_adapter_bytes + 1024 * 1024)
        return limits.max_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    if getattr(service, "refused_at", None) is not None:  # refusals of every stage are audited (issue 25)
        app.add_middleware(RefusalAuditMiddleware, record=service.refused_at)
    app.add_middleware(RequestIdMiddleware, transport_id=transport_request_id)

    @app.exception_handler(MedlegoError)
    async def _medlego_error(request: Request, e: MedlegoError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(BadInputError("invalid request: " + "; ".join(parts)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"detail": e.detail, "type": "HTTPError"}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return error_response(e)

    def need(route: str, authorization: str | None) -> None:
        """The token check of `route` from the one role table (serving/auth.py ROUTES), before any body is read."""
        service.auth.check_route(authorization, route)

    # -- diagnosis ------------------------------------------------------------------------------
    @app.post("/v1/diagnose", tags=["diagnosis"], openapi_extra=_DIAGNOSE_BODY,
              summary="Diagnose one image with a registered adapter")
    async def diagnose(request: Request, authorization: str | None = Header(None)):
        need("POST /v1/diagnose", authorization)
        items = await _read_items(request, service, batch=False)
        return await service.diagnose(items[0], api="rest")

    @app.post("/v1/diagnose/batch", tags=["diagnosis"], openapi_extra=_BATCH_BODY,
              summary="Diagnose several images (each with its own adapter and task) in one call")
    async def diagnose_batch(request: Request, authorization: str | None = Header(None)):
        need("POST /v1/diagnose/batch", authorization)
        items = await _read_items(request, service, batch=True)
        return {"results": await service.diagnose_many(items, api="rest")}

    # -- registry reads (diagnosis token) -------------------------------------------------------
    @app.get("/v1/adapters", tags=["adapters"], summary="Every registered adapter version and alias")
    async def list_adapters(authorization: str | None = Header(None)):
        need("GET /v1/adapters", authorization)
        return await service.list_adapters()

    @app.get("/v1/adapters/{ref}", tags=["adapters"], summary="Metadata of NAME, NAME@VERSION or an alias")
    async def describe_adapter(ref: str, authorization: str | None = Header(None)):
        need("GET /v1/adapters/{ref}", authorization)
        return await service.describe(ref)

    # -- registry writes (admin token) -----------------------------------------------------------
    @app.post("/v1/adapters", tags=["admin"], status_code=201, openapi_extra=_UPLOAD_BODY,
              summary="Register an adapter upload (validated against the resident base first)")
    async def register_adapter(request: Request, authorization: str | None = Header(None)):
        need("POST /v1/adapters", authorization)
        form = await _form(request, limits.max_adapter_bytes)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadInputError("multipart field 'file' (the .safetensors adapter) is required")
        name = form.get("name")
        if not name or not isinstance(name, str):
            raise BadInputError("multipart field 'name' is required")
        data = await _read_upload(upload, limits.max_adapter_bytes, "adapter upload")
        aliases = [a for a in form.getlist("alias") if isinstance(a, str) and a]
        move = form.get("move_alias")
        if move not in (None, "", "true", "false", "1", "0"):
            raise BadInputError("multipart field 'move_alias' must be true or false")
        return await service.register(name, data, aliases, move_aliases=move in ("true", "1"))

    @app.delete("/v1/adapters/{ref}", tags=["admin"],
                summary="Delete NAME@VERSION (every version of NAME with ?all_versions=true); 409 while pinned")
    async def delete_adapter(ref: str, all_versions: bool = Query(False), authorization: str | None = Header(None)):
        need("DELETE /v1/adapters/{ref}", authorization)
        return {"deleted": await service.delete(ref, all_versions)}

    @app.post("/v1/adapters/{ref}/pin", tags=["admin"], summary="Pin (keep on the device, refuse deletion)")
    async def pin_adapter(ref: str, authorization: str | None = Header(None)):
        need("POST /v1/adapters/{ref}/pin", authorization)
        return await service.pin(ref)

    @app.post("/v1/adapters/{ref}/unpin", tags=["admin"], summary="Unpin")
    async def unpin_adapter(ref: str, authorization: str | None = Header(None)):
        need("POST /v1/adapters/{ref}/unpin", authorization)
        return await service.unpin(ref)

    @app.get("/v1/aliases", tags=["adapters"], summary="Every alias and its target")
    async def list_aliases(authorization: str | None = Header(None)):
        need("GET /v1/aliases", authorization)
        return await service.aliases()

    @app.put("/v1/aliases/{alias}", tags=["admin"], openapi_extra=_ALIAS_BODY,
             summary="Point ALIAS at NAME@VERSION (or NAME: follow its latest version)")
    async def set_alias(alias: str, request: Request, authorization: str | None = Header(None)):
        need("PUT /v1/aliases/{alias}", authorization)  # before the body is read
        body = await _json_object(request, service)
        return await service.set_alias(alias, _field(body, "target", str, required=True))

    @app.delete("/v1/aliases/{alias}", tags=["admin"], summary="Remove an alias")
    async def remove_alias(alias: str, authorization: str | None = Header(None)):
        need("DELETE /v1/aliases/{alias}", authorization)
        await service.remove_alias(alias)
        return {"removed": alias}

    @app.post("/v1/merge", tags=["admin"], status_code=201, openapi_extra=_MERGE_BODY,
              summary="Merge registered adapters (Med-LEGO by default) and register the result")
    async def merge(request: Request, authorization: str | None = Header(None)):
        need("POST /v1/merge", authorization)  # before the body is read
        body = await _json_object(request, service)
        task_names = _field(body, "task_names", list)
        return await service.merge(MergeSpec(
            _field(body, "name", str, required=True), _strings(_field(body, "sources", list, required=True), "sources"),
            _field(body, "method", str) or "med-lego", _field(body, "params", dict) or {},
            _strings(_field(body, "aliases", list) or [], "aliases"),
            None if task_names is None else _strings(task_names, "task_names"),
            bool(_field(body, "move_alias", bool))))

    # -- ops ------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"], summary="Alive")
    async def healthz():
        return {"alive": True}

    @app.get("/readyz", tags=["ops"], summary="Ready: base loaded and warmed up")
    async def readyz():
        h = await service.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/v1/info", tags=["ops"], summary="The resident base, device and pool")
    async def info(authorization: str | None = Header(None)):
        need("GET /v1/info", authorization)
        return await service.info()

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (needs the API token when one is set)")
    async def metrics(authorization: str | None = Header(None)):
        need("GET /metrics", authorization)  # open when [auth] metrics_public
        return Response(await service.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/v1/audit", tags=["audit"],
             summary="Audit rows (admin or read role), oldest first, a page at a time: pass 'next' back as ?after=")
    async def audit(since: str | None = None, until: str | None = None, adapter: str | None = None,
                    caller: str | None = None, image_sha256: str | None = None, kind: str | None = None,
                    limit: int = Query(MAX_AUDIT_PAGE, ge=1, le=MAX_AUDIT_PAGE),
                    after: int = Query(0, ge=0, description="the 'next' of the previous page: rows after this seq"),
                    authorization: str | None = Header(None)):
        need("GET /v1/audit", authorization)
        rows = await service.audit_rows(since=since, until=until, adapter=adapter, caller=caller,
                                        image_sha256=image_sha256, kind=kind, limit=limit, after_seq=after)
        page = {"rows": rows, "next": rows[-1]["seq"] if len(rows) == limit else None}
        return await run_in_threadpool(JSONResponse, page)  # the page is serialised off the event loop

    mount_kserve(app, service)  # /v2: the Open Inference Protocol (serving/kserve_rest.py)
    return app


# -- request parsing -----------------------------------------------------------------------------
async def _form(request: Request, max_file_bytes: int):
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise BadInputError(f"expected a multipart/form-data upload, got '{ctype or 'no content type'}'")
    try:
        return await request.form(max_files=256, max_fields=256, max_part_size=64 * 1024)
    except StarletteHTTPException as e:
        raise BadInputError(f"malformed multipart body: {e.detail}") from None
    except MedlegoError:
        raise
    except Exception as e:  # a truncated or garbled multipart stream
        raise BadInputError(f"malformed multipart body: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


async def _json_object(request: Request, service: DiagnosisAPI) -> dict:
    """The JSON object of a request body (read only after the route's token check), parsed off the event loop."""
    ctype = request.headers.get("content-type", "")
    if ctype and not ctype.startswith("application/json"):
        raise BadInputError(f"unsupported content type '{ctype}': send application/json")
    body = await checks.parse_json_off_loop(await checks.read_body(request), service.limits)
    if not isinstance(body, dict):
        raise BadInputError("the JSON body must be an object")
    return body


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def _field(body: dict, name: str, kind: type, required: bool = False) -> Any:
    """One field of a JSON object body: None when absent, else of `kind` (a 400 that names it otherwise)."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadInputError(f"invalid request: {name}: Field required")
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInputError(f"invalid request: {name}: must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


def _strings(values: list, name: str) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise BadInputError(f"invalid request: {name}: must be a list of strings")
    return values


async def _read_upload(upload, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"{what} is above the limit of {limit} bytes")
    return data


async def _read_items(request: Request, service: DiagnosisAPI, batch: bool) -> list[DiagnoseItem]:
    """Multipart (file + fields) or JSON (base64 image) → the items to diagnose."""
    limits = service.limits
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await _form(request, limits.max_image_bytes)
        files = [f for f in form.getlist("file") + form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise BadInputError("multipart field 'file' (the image) is required")
        if not batch and len(files) > 1:
            raise BadInputError("several files sent: use /v1/diagnose/batch for more than one image")
        if batch:
            checks.check_batch(limits, len(files))
        adapters = [a for a in form.getlist("adapter") if isinstance(a, str)]
        tasks = [t for t in form.getlist("task") if isinstance(t, str)]
        top_k = checks.check_top_k(limits, form.get("top_k"))
        images = [await _read_upload(f, limits.max_image_bytes, f"image '{f.filename or 'file'}'") for f in files]
        return [DiagnoseItem(img, _per_item(adapters, n, len(images), "adapter") or "",
                             _per_item(tasks, n, len(images), "task"), top_k) for n, img in enumerate(images)]
    if ctype.startswith("application/json") or not ctype:
        raw = await checks.read_body(request)
        return await run_in_threadpool(_json_items, limits, raw, batch)  # parse + base64: off the event loop
    raise BadInputError(f"unsupported content type '{ctype}': send multipart/form-data or application/json")


def _json_items(limits, raw: bytes, batch: bool) -> list[DiagnoseItem]:
    """A JSON diagnose body → its items (runs in a worker thread)."""
    body = checks.parse_json(raw, limits.max_json_elements)
    if not isinstance(body, dict):
        raise BadInputError("the JSON body must be an object")
    if not batch:
        return [_json_item(limits, body, {})]
    items = body.get("items")
    if items is None and isinstance(body.get("images"), list):
        items = [{"image": img} for img in body["images"]]
    if not isinstance(items, list):
        raise BadInputError("a batch needs 'items': [{\"image\": base64, \"adapter\": ...}, ...]")
    checks.check_batch(limits, len(items))
    return [_json_item(limits, it, body, n) for n, it in enumerate(items)]


def _json_item(limits, obj, defaults: dict, index: int | None = None) -> DiagnoseItem:
    where = "" if index is None else f"items[{index}]."
    if not isinstance(obj, dict):
        raise BadInputError(f"{where or 'body'} must be an object")
    if obj.get("image") is None:
        raise BadInputError(f"'{where}image' (base64 PNG/JPEG/DICOM bytes) is required")
    return DiagnoseItem(
        image=checks.decode_base64(obj["image"], f"{where}image"),
        adapter=checks.check_text(obj.get("adapter", defaults.get("adapter")), f"{where}adapter") or "",
        task=checks.check_text(obj.get("task", defaults.get("task")), f"{where}task"),
        top_k=checks.check_top_k(limits, obj.get("top_k", defaults.get("top_k"))))


def _per_item(values: list[str], n: int, count: int, field: str) -> str | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0] or None
    if len(values) != count:
        raise BadInputError(f"give one '{field}' for every image, or one for all ({len(values)} for {count} images)")
    return values[n] or None
