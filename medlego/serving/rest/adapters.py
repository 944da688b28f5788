"""The registry reads: GET /v1/adapters, /v1/adapters/{ref}, /v1/aliases (diagnosis or read token)."""

from __future__ import annotations

from fastapi import APIRouter, Header

from ..contract import DiagnosisAPI


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["adapters"])

    @r.get("/v1/adapters", summary="Every registered adapter version and alias")
    async def list_adapters(authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/adapters")
        return await service.list_adapters()

    @r.get("/v1/adapters/{ref}", summary="Metadata of NAME, NAME@VERSION or an alias")
    async def describe_adapter(ref: str, authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/adapters/{ref}")
        return await service.describe(ref)

    @r.get("/v1/aliases", summary="Every alias and its target")
    async def list_aliases(authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/aliases")
        return await service.aliases()

    return r
