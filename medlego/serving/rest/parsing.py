"""Reading REST request bodies: multipart and JSON, after the route's token check, within the limits
(``serving/limits.py``); JSON parsing and base64 decoding run in a worker thread."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.concurrency import run_in_threadpool
from medlego.runtime.errors import BadInputError, PayloadTooLargeError

from .. import limits as checks
from ..contract import DiagnoseItem, DiagnosisAPI
from .multipart import FilePart, Form, FormParser


FEED_BYTES = 1 << 20  # body bytes handed to the parsing thread at a time: one thread hop per megabyte


async def read_form(request: Request) -> Form:
    """A multipart body (read only after the route's token check, bounded by the app's body limit),
    parsed in worker threads as it arrives (multipart.py says why)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise BadInputError(f"expected a multipart/form-data upload, got '{ctype or 'no content type'}'")
    parser, pending = FormParser(ctype), bytearray()
    try:
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= FEED_BYTES:
                await run_in_threadpool(parser.feed, bytes(pending))
                pending.clear()
    except ClientDisconnect:
        raise BadInputError("the client closed the connection before its whole request body arrived") from None
    if pending:
        await run_in_threadpool(parser.feed, bytes(pending))
    return await run_in_threadpool(parser.finish)


async def json_object(request: Request, service: DiagnosisAPI) -> dict:
    """The JSON object of a request body (read only after the route's token check), parsed off the event loop."""
    ctype = request.headers.get("content-type", "")
    if ctype and not ctype.startswith("application/json"):
        raise BadInputError(f"unsupported content type '{ctype}': send application/json")
    body = await checks.parse_json_off_loop(await checks.read_body(request), service.limits)
    if not isinstance(body, dict):
        raise BadInputError("the JSON body must be an object")
    return body


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def field(body: dict, name: str, kind: type, required: bool = False) -> Any:
    """One field of a JSON object body: None when absent, else of `kind` (a 400 that names it otherwise)."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadInputError(f"invalid request: {name}: Field required")
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInputError(f"invalid request: {name}: must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


def strings(values: list, name: str) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise BadInputError(f"invalid request: {name}: must be a list of strings")
    return values


def read_upload(upload: FilePart, limit: int, what: str) -> bytes:
    if len(upload.data) > limit:
        raise PayloadTooLargeError(f"{what} is above the limit of {limit} bytes")
    return upload.data


async def read_items(request: Request, service: DiagnosisAPI, batch: bool) -> list[DiagnoseItem]:
    """Multipart (file + fields) or JSON (base64 image) → the items to diagnose."""
    limits = service.limits
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await read_form(request)
        files = [f for f in form.getlist("file") + form.getlist("files") if isinstance(f, FilePart)]
        if not files:
            raise BadInputError("multipart field 'file' (the image) is required")
        if not batch and len(files) > 1:
            raise BadInputError("several files sent: use /v1/diagnose/batch for more than one image")
        if batch:
            checks.check_batch(limits, len(files))
        adapters = [a for a in form.getlist("adapter") if isinstance(a, str)]
        tasks = [t for t in form.getlist("task") if isinstance(t, str)]
        top_k = checks.check_top_k(limits, form.get("top_k"))
        images = [read_upload(f, limits.max_image_bytes, f"image '{f.filename or 'file'}'") for f in files]
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


def _per_item(values: list[str], n: int, count: int, what: str) -> str | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0] or None
    if len(values) != count:
        raise BadInputError(f"give one '{what}' for every image, or one for all ({len(values)} for {count} images)")
    return values[n] or None
