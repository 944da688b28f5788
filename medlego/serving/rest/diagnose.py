"""POST /v1/diagnose and /v1/diagnose/batch (diagnosis token)."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request

from ..contract import DiagnosisAPI
from .bodies import BATCH_BODY, DIAGNOSE_BODY
from .parsing import read_items


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["diagnosis"])

    @r.post("/v1/diagnose", openapi_extra=DIAGNOSE_BODY, summary="Diagnose one image with a registered adapter")
    async def diagnose(request: Request, authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "POST /v1/diagnose")
        items = await read_items(request, service, batch=False)
        return await service.diagnose(items[0], api="rest")

    @r.post("/v1/diagnose/batch", openapi_extra=BATCH_BODY,
            summary="Diagnose several images (each with its own adapter and task) in one call")
    async def diagnose_batch(request: Request, authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "POST /v1/diagnose/batch")
        items = await read_items(request, service, batch=True)
        return {"results": await service.diagnose_many(items, api="rest")}

    return r
