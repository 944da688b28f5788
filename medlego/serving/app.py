"""The REST API (FastAPI), written once against the serving contract (:class:`~.contract.DiagnosisAPI`).

:func:`create_app` assembles the parts: the routers of ``/v1`` and the ops routes (``rest/``: one
module per concern), ``/v2`` (the Open Inference Protocol, ``kserve_rest.py``), the middleware
(``middleware.py``: body limit, request id, refusal audit) and the error handlers. The embedded
server passes a :class:`~.service.DiagnosisService`, the Ray ingress a
:class:`~.ray_frontend.RayFrontend`. Errors are :class:`MedlegoError`s answered with their class's
status (``runtime/errors.py``) and ``{"detail": message, "type": ErrorClass}``; 503 adds
``Retry-After``, 401 ``WWW-Authenticate`` (``http_errors.py``). The OpenAPI page is at ``/docs``;
its scripts and styles are served by this app, so it works offline.
"""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlego.runtime.errors import BadInputError, MedlegoError

from .contract import DiagnosisAPI
from .docs_assets import add_offline_docs
from .http_errors import error_response
from .kserve_rest import mount_kserve
from .limits import body_limit
from .middleware import BodyLimitMiddleware, RefusalAuditMiddleware, RequestIdMiddleware
from .rest import routers


def create_app(service: DiagnosisAPI, *, title: str = "medlego",
               transport_request_id: Callable[[], str] | None = None) -> FastAPI:
    """`transport_request_id`: the request id a proxy in front already answers with (Ray's HTTP proxy)."""
    app = FastAPI(
        title=title, version="1", docs_url=None, redoc_url=None,  # /docs: add_offline_docs below
        description="Medical image diagnosis with one frozen ViT and hot-swapped SVD-LoRA adapters. "
                    "Admin routes need `Authorization: Bearer <MEDLEGO_ADMIN_TOKEN>`; diagnosis needs "
                    "`Bearer <MEDLEGO_API_TOKEN>` when one is configured.")
    add_offline_docs(app)
    app.state.service = service
    limits = service.limits
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: body_limit(limits, path))
    app.add_middleware(RefusalAuditMiddleware, record=service.refused_at)  # every stage's refusals (issue 25)
    app.add_middleware(RequestIdMiddleware, transport_id=transport_request_id)
    add_error_handlers(app)
    for router in routers(service):
        # the routes themselves, not include_router: FastAPI (0.16x) keeps an included router as one
        # opaque entry of app.routes, and the role-table test walks app.routes for every route
        app.router.routes.extend(router.routes)
    mount_kserve(app, service)  # /v2: the Open Inference Protocol (serving/kserve_rest.py)
    return app


def add_error_handlers(app: FastAPI) -> None:
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
