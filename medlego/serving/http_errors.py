"""One place for what every HTTP error answer carries, on /v1 and /v2 alike: the status of the error's
class (``runtime/errors.py``), ``Retry-After`` on 503 (overloaded), ``WWW-Authenticate`` on 401.
/v1's body is ``{"detail": message, "type": ErrorClass}`` (:func:`error_response`); /v2's the Open
Inference Protocol's ``{"error": message}`` (``kserve_rest.v2_error``)."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from medlego.runtime.errors import MedlegoError, OverloadedError, answer_of

log = logging.getLogger("medlego.serving")


def error_status_headers(e: BaseException) -> tuple[int, dict[str, str]]:
    """The HTTP status of `e` and the headers that go with it; an unexpected error (a bug) is logged."""
    status = answer_of(e)[0]
    if not isinstance(e, MedlegoError):
        log.error("internal error", exc_info=e)
    headers = {}
    if isinstance(e, OverloadedError):
        headers["Retry-After"] = str(e.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return status, headers


def error_response(e: BaseException) -> JSONResponse:
    """/v1's error answer; a bug is answered without internals."""
    status, headers = error_status_headers(e)
    if isinstance(e, MedlegoError):
        body = {"detail": str(e), "type": type(e).__name__}
    else:
        body = {"detail": "internal server error", "type": "InternalError"}
    return JSONResponse(body, status_code=status, headers=headers)
