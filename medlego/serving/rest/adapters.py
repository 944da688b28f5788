"""The registry reads: GET /v1/adapters, /v1/adapters/{ref}, /v1/aliases (diagnosis or read token)."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..contract import DiagnosisAPI


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["adapters"])

    @r.get("/v1/adapters", summary="A page of registered adapter versions (name order) and their aliases; "
                                    "pass next_cursor back as ?cursor= for the next page")
    async def list_adapters(limit: int | None = Query(None, description="versions per page: 1 to 1000 (default 100)"),
                            cursor: str | None = Query(None, description="the next_cursor of the previous page"),
                            prefix: str | None = Query(None, description="only names starting with this"),
                            task: str | None = Query(None, description="only adapters with this task"),
                            base: str | None = Query(None, description="only adapters for this base fingerprint"),
                            authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/adapters")
        page = await service.list_adapters(limit, cursor, prefix, task, base)
        return await run_in_threadpool(JSONResponse, page)  # up to 1000 versions: serialised off the event loop

    @r.get("/v1/adapters/{ref}", summary="Metadata of NAME, NAME@VERSION or an alias")
    async def describe_adapter(ref: str, authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/adapters/{ref}")
        return await service.describe(ref)

    @r.get("/v1/aliases", summary="Every alias and its target")
    async def list_aliases(authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/aliases")
        return await service.aliases()

    return r
