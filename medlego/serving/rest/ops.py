"""Ops: /healthz and /readyz (open), /v1/info and /metrics (token per the role table)."""

from __future__ import annotations

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response

from ..contract import DiagnosisAPI
from ..metrics import CONTENT_TYPE


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["ops"])

    @r.get("/healthz", summary="Alive")
    async def healthz():
        return {"alive": True}

    @r.get("/readyz", summary="Ready: base loaded and warmed up")
    async def readyz():
        h = await service.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @r.get("/v1/info", summary="The resident base, device and pool")
    async def info(authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/info")
        return await service.info()

    @r.get("/metrics", summary="Prometheus metrics (needs the API token when one is set)")
    async def metrics(authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /metrics")  # open when [auth] metrics_public
        return Response(await service.metrics_text(), media_type=CONTENT_TYPE)

    return r
