"""GET /v1/audit (admin or read role): audit rows, oldest first, a page at a time."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..contract import MAX_AUDIT_PAGE, DiagnosisAPI


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["audit"])

    @r.get("/v1/audit",
           summary="Audit rows (admin or read role), oldest first, a page at a time: pass 'next' back as ?after=")
    async def audit(since: str | None = None, until: str | None = None, adapter: str | None = None,
                    caller: str | None = None, image_sha256: str | None = None, kind: str | None = None,
                    limit: int = Query(MAX_AUDIT_PAGE, ge=1, le=MAX_AUDIT_PAGE),
                    after: int = Query(0, ge=0, description="the 'next' of the previous page: rows after this seq"),
                    authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/audit")
        rows = await service.audit_rows(since=since, until=until, adapter=adapter, caller=caller,
                                        image_sha256=image_sha256, kind=kind, limit=limit, after_seq=after)
        page = {"rows": rows, "next": rows[-1]["seq"] if len(rows) == limit else None}
        return await run_in_threadpool(JSONResponse, page)  # the page is serialised off the event loop

    return r
