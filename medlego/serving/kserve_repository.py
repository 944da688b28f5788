"""The model repository extension's index, ``POST /v2/repository/index``, paged like ``GET /v1/adapters``.

The protocol answers a JSON array of ``{"name", "version", "state", "reason"}``; a registry of ten
thousand adapters would make that one unbounded answer, so the index is a page of the same
keyset listing as ``/v1`` (``runtime/registry/listing.py``). The body's optional ``limit``,
``cursor``, ``prefix``, ``task`` and ``base`` (a client that sends none of them, e.g. Triton's
client with ``{"ready": true}``, gets the first page); the next page's cursor is in the
``X-Next-Cursor`` header, absent on the last page, so the array itself keeps the protocol's shape.
Every registered version is servable (loaded on first use), so each is ``READY``. The gRPC
``RepositoryIndex`` (``kserve_grpc.py``) answers the same page from the same :func:`index_page`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from medlego.runtime.errors import BadInputError

from . import limits as checks
from .contract import DiagnosisAPI

ROUTE = "POST /repository/index"
NEXT_CURSOR_HEADER = "X-Next-Cursor"
_FIELDS = ("ready", "limit", "cursor", "prefix", "task", "base")


def _body(raw: bytes) -> dict:
    body = checks.parse_json(raw, 64) if raw.strip() else {}  # six fields: anything bigger is refused (413)
    if not isinstance(body, dict):
        raise BadInputError("the repository index body must be a JSON object, e.g. {\"ready\": true}")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise BadInputError(f"unknown field {unknown[0]!r} in the repository index body (known: {', '.join(_FIELDS)})")
    for key in ("cursor", "prefix", "task", "base"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadInputError(f"'{key}' must be a string")
    if body.get("limit") is not None and (isinstance(body["limit"], bool) or not isinstance(body["limit"], int)):
        raise BadInputError("'limit' must be an integer")
    return body


async def index_page(service: DiagnosisAPI, limit: int | None = None, cursor: str | None = None,
                     prefix: str | None = None, task: str | None = None,
                     base: str | None = None) -> tuple[list[dict], str | None]:
    """One page of the index, as the extension's entries, and the next page's cursor (None: the last)."""
    page = await service.list_adapters(limit, cursor, prefix, task, base)
    index = [{"name": a["name"], "version": str(a["version"]), "state": "READY", "reason": ""} for a in page["adapters"]]
    return index, page.get("next_cursor")


def mount_repository(v2: FastAPI, service: DiagnosisAPI, auth) -> None:
    """Add the index route to the /v2 sub-application; auth(request, route) checks the token first."""

    async def repository_index(request: Request):
        auth(request, ROUTE)
        body = _body(await request.body())
        index, cursor = await index_page(service, body.get("limit"), body.get("cursor"), body.get("prefix"),
                                         body.get("task"), body.get("base"))
        return JSONResponse(index, headers={NEXT_CURSOR_HEADER: cursor} if cursor else None)

    v2.add_api_route("/repository/index", repository_index, methods=["POST"], tags=["v2"],
                     summary="Model repository index: a page of registered versions (next page: X-Next-Cursor)")
