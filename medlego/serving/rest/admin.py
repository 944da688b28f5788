"""The registry writes (admin token): upload, delete, pin, unpin, aliases, merge — ``service.admin``."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request

from medlego.runtime.errors import BadInputError

from ..contract import DiagnosisAPI, MergeSpec
from .bodies import ALIAS_BODY, MERGE_BODY, UPLOAD_BODY
from .multipart import FilePart
from .parsing import field, json_object, read_form, read_upload, strings


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["admin"])
    auth, admin, limits = service.auth, service.admin, service.limits

    @r.post("/v1/adapters", status_code=201, openapi_extra=UPLOAD_BODY,
            summary="Register an adapter upload (validated against the resident base first)")
    async def register_adapter(request: Request, authorization: str | None = Header(None)):
        auth.check_route(authorization, "POST /v1/adapters")
        form = await read_form(request)
        upload = form.get("file")
        if not isinstance(upload, FilePart):
            raise BadInputError("multipart field 'file' (the .safetensors adapter) is required")
        name = form.get("name")
        if not name or not isinstance(name, str):
            raise BadInputError("multipart field 'name' is required")
        data = read_upload(upload, limits.max_adapter_bytes, "adapter upload")
        aliases = [a for a in form.getlist("alias") if isinstance(a, str) and a]
        move = form.get("move_alias")
        if move not in (None, "", "true", "false", "1", "0"):
            raise BadInputError("multipart field 'move_alias' must be true or false")
        return await admin.register(name, data, aliases, move_aliases=move in ("true", "1"))

    @r.delete("/v1/adapters/{ref}",
              summary="Delete NAME@VERSION (every version of NAME with ?all_versions=true); 409 while pinned")
    async def delete_adapter(ref: str, all_versions: bool = Query(False), authorization: str | None = Header(None)):
        auth.check_route(authorization, "DELETE /v1/adapters/{ref}")
        return {"deleted": await admin.delete(ref, all_versions)}

    @r.post("/v1/adapters/{ref}/pin", summary="Pin (keep on the device, refuse deletion)")
    async def pin_adapter(ref: str, authorization: str | None = Header(None)):
        auth.check_route(authorization, "POST /v1/adapters/{ref}/pin")
        return await admin.pin(ref)

    @r.post("/v1/adapters/{ref}/unpin", summary="Unpin")
    async def unpin_adapter(ref: str, authorization: str | None = Header(None)):
        auth.check_route(authorization, "POST /v1/adapters/{ref}/unpin")
        return await admin.unpin(ref)

    @r.put("/v1/aliases/{alias}", openapi_extra=ALIAS_BODY,
           summary="Point ALIAS at NAME@VERSION (or NAME: follow its latest version)")
    async def set_alias(alias: str, request: Request, authorization: str | None = Header(None)):
        auth.check_route(authorization, "PUT /v1/aliases/{alias}")  # before the body is read
        body = await json_object(request, service)
        return await admin.set_alias(alias, field(body, "target", str, required=True))

    @r.delete("/v1/aliases/{alias}", summary="Remove an alias")
    async def remove_alias(alias: str, authorization: str | None = Header(None)):
        auth.check_route(authorization, "DELETE /v1/aliases/{alias}")
        await admin.remove_alias(alias)
        return {"removed": alias}

    @r.post("/v1/merge", status_code=201, openapi_extra=MERGE_BODY,
            summary="Merge registered adapters (Med-LEGO by default) and register the result")
    async def merge(request: Request, authorization: str | None = Header(None)):
        auth.check_route(authorization, "POST /v1/merge")  # before the body is read
        return await admin.merge(merge_spec(await json_object(request, service)))

    return r


def merge_spec(body: dict) -> MergeSpec:
    """POST /v1/merge's JSON object → the merge's inputs (each field's type checked, 400 naming it)."""
    task_names = field(body, "task_names", list)
    return MergeSpec(
        field(body, "name", str, required=True), strings(field(body, "sources", list, required=True), "sources"),
        field(body, "method", str) or "med-lego", field(body, "params", dict) or {},
        strings(field(body, "aliases", list) or [], "aliases"),
        None if task_names is None else strings(task_names, "task_names"),
        bool(field(body, "move_alias", bool)))
