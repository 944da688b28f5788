"""The Open Inference Protocol (KServe v2) over REST, on the same port as ``/v1`` (``kserve.py``).

    GET  /v2/health/live, /v2/health/ready, /v2
    GET  /v2/models/{model}[/versions/{v}], …/ready
    POST /v2/models/{model}[/versions/{v}]/infer

Bodies are JSON, or JSON followed by binary tensor data (the binary tensor extension: the JSON's
length in the ``Inference-Header-Content-Length`` header; each binary input says its byte count
in ``parameters.binary_data_size``). Answers use the binary form when the request asks for it
(an output's ``parameters.binary_data``, or the request's ``parameters.binary_data_output``),
as Triton does. Errors are the protocol's ``{"error": "…"}`` with the status of the error's class
(``runtime/errors.py``: 400 bad input, 404 unknown model, 413, 503 …). The body is bounded by the
app's :class:`~.app.BodyLimitMiddleware` (``max_body_bytes``) before it is read; the token
(``Authorization: Bearer``) is checked before the body is read, by the one role table of ``/v1`` and
gRPC (``auth.ROUTES``: model metadata and readiness "describe", infer "diagnose"); health is open,
like ``/healthz``. The body is parsed and its tensors built in a worker thread, within
``max_json_elements``.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlego.runtime.errors import BadInputError, MedlegoError, PayloadTooLargeError

from . import kserve
from . import limits as checks
from .contract import DiagnosisAPI
from .http_errors import error_status_headers
from .kserve_repository import mount_repository


HEADER_LENGTH = "inference-header-content-length"


def v2_error(e: BaseException) -> JSONResponse:
    """The protocol's error body, with the status and headers of the error's class (http_errors.py)."""
    status, headers = error_status_headers(e)
    return JSONResponse({"error": kserve.error_message(e)}, status_code=status, headers=headers)


def _route_of(request: Request, what: str = "") -> str:
    """The role table's template of a model route (with or without a version)."""
    suffix = "/versions/{version}" if "version" in request.path_params else ""
    return f"{request.method} /models/{{model}}{suffix}{what}"


def mount_kserve(app: FastAPI, service: DiagnosisAPI) -> None:
    """Serve /v2 from `app`: the protocol's routes in a sub-application (its own error format)."""
    v2 = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(v2)

    def auth(request: Request, route: str) -> None:
        """The check of `route` (the v2 template, e.g. "GET /models/{model}") in the one role table (auth.py ROUTES)."""
        service.auth.check_route(request.headers.get("authorization"), route.replace(" /", " /v2/", 1))

    async def server_metadata():
        return {"name": kserve.SERVER_NAME, "version": kserve.server_version(), "extensions": list(kserve.EXTENSIONS)}

    app.add_api_route("/v2", server_metadata, methods=["GET"], tags=["v2"], summary="Open Inference Protocol: server metadata")

    @v2.get("/", include_in_schema=False)
    async def _server_metadata():
        return await server_metadata()

    @v2.get("/health/live", tags=["v2"], summary="Open Inference Protocol: liveness")
    async def live():
        return Response(status_code=200)

    @v2.get("/health/ready", tags=["v2"], summary="Open Inference Protocol: readiness")
    async def ready():
        return Response(status_code=200 if await kserve.server_ready(service) else 503)

    async def model_metadata(request: Request, model: str, version: str | None = None):
        try:
            auth(request, _route_of(request))
            return await kserve.model_metadata(service, model, version)
        except Exception as e:
            return v2_error(e)

    async def model_ready(request: Request, model: str, version: str | None = None):
        try:
            auth(request, _route_of(request, "/ready"))
            ok = await kserve.model_ready(service, model, version)
        except Exception as e:
            return v2_error(e)
        return Response(status_code=200) if ok else JSONResponse({"error": "the server is not ready"}, status_code=503)

    async def model_infer(request: Request, model: str, version: str | None = None):
        try:
            auth(request, _route_of(request, "/infer"))
            return await _infer(service, request, model, version)
        except Exception as e:
            return v2_error(e)

    for prefix in ("/models/{model}", "/models/{model}/versions/{version}"):
        v2.add_api_route(prefix, model_metadata, methods=["GET"], tags=["v2"],
                         summary="Model metadata: an adapter (or alias) is a model, its registry version the version")
        v2.add_api_route(prefix + "/ready", model_ready, methods=["GET"], tags=["v2"], summary="Model readiness")
        v2.add_api_route(prefix + "/infer", model_infer, methods=["POST"], tags=["v2"], openapi_extra=_INFER_BODY,
                         summary="Inference: `image` (BYTES) or `pixel_values` (FP32) [+ `task`] -> `probabilities`")
    mount_repository(v2, service, auth)  # POST /v2/repository/index, paged (kserve_repository.py)
    app.mount("/v2", v2)
    _document_v2(app, v2)


_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}, "parameters": {"type": "object"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "the binary tensor extension (Inference-Header-Content-Length)"}}}}}


def _document_v2(app: FastAPI, v2: FastAPI) -> None:
    """The mounted /v2 app's routes in the main app's OpenAPI document (FastAPI leaves a mount out of it)."""
    from fastapi.openapi.utils import get_openapi

    main_openapi = app.openapi

    def openapi_with_v2() -> dict:
        if app.openapi_schema is None:
            schema = main_openapi()
            sub = get_openapi(title="v2", version=kserve.server_version(), routes=v2.routes)
            for path, item in sub.get("paths", {}).items():
                schema["paths"]["/v2" + path] = item
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                sub.get("components", {}).get("schemas", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_v2


def _add_error_handlers(v2: FastAPI) -> None:
    @v2.exception_handler(MedlegoError)
    async def _expected(request: Request, e: MedlegoError):
        return v2_error(e)

    @v2.exception_handler(Exception)
    async def _any(request: Request, e: Exception):
        return v2_error(e)

    @v2.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": f"{e.detail}: {request.method} {request.url.path}"}, status_code=e.status_code)


# -- the infer body ----------------------------------------------------------------------------------
def _split(raw: bytes, header_length: str | None, max_elements: int | None = None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = raw, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(raw):
            raise BadInputError(f"'Inference-Header-Content-Length' must be an integer between 0 and the body's "
                                f"{len(raw)} bytes, got {header_length!r:.40}")
        n = int(header_length)
        json_part, binary = raw[:n], raw[n:]
    body = checks.parse_json(json_part, max_elements)
    if not isinstance(body, dict):
        raise BadInputError("the inference request must be a JSON object")
    return body, binary


def _tensor(spec, binary: bytes, pos: int, max_elements: int | None = None) -> tuple[kserve.Tensor, int]:
    if not isinstance(spec, dict):
        raise BadInputError("each of 'inputs' must be an object with name, shape, datatype and data")
    name = checks.check_text(spec.get("name"), "inputs[].name", required=True) or ""
    datatype = spec.get("datatype")
    if datatype not in ("BYTES", "FP32"):
        raise BadInputError(f"input '{name}': datatype must be BYTES or FP32, got {datatype!r:.40}")
    shape = kserve.check_shape(name, spec.get("shape"))
    if max_elements is not None and kserve.elements(shape) > max_elements:
        raise PayloadTooLargeError(f"input '{name}': shape {list(shape)} has {kserve.elements(shape)} elements; "
                                   f"the limit is {max_elements}")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadInputError(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or pos + size > len(binary):
            raise BadInputError(f"input '{name}': binary_data_size {size!r:.40} does not fit the "
                                f"{len(binary) - pos} bytes of binary data left")
        raw = binary[pos:pos + size]
        pos += size
        if datatype == "BYTES":
            return kserve.Tensor(name, datatype, shape, kserve.unpack_bytes(name, raw, kserve.elements(shape))), pos
        return kserve.Tensor(name, datatype, shape, kserve.fp32_from_raw(name, raw, shape)), pos
    if "data" not in spec:
        raise BadInputError(f"input '{name}': give 'data', or binary data with parameters.binary_data_size")
    data = spec["data"]
    if datatype == "FP32":
        return kserve.Tensor(name, datatype, shape, kserve.fp32_from_values(name, data, shape)), pos
    values = _flat(data) if isinstance(data, list) else [data]
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v.encode("utf-8", "surrogatepass"))
        elif isinstance(v, dict) and isinstance(v.get("b64"), str):  # {"b64": "…"}: binary content in JSON
            out.append(checks.decode_base64(v["b64"], f"input '{name}' element"))
        else:
            raise BadInputError(f"input '{name}': BYTES elements must be strings (or {{\"b64\": base64}})")
    if len(out) != kserve.elements(shape):
        raise BadInputError(f"input '{name}': {len(out)} elements for shape {list(shape)}")
    return kserve.Tensor(name, datatype, shape, out), pos


def _flat(data: list, depth: int = 0) -> list:
    """Nested JSON lists → their elements in row-major order."""
    if depth > 8:
        raise BadInputError("tensor data is nested deeper than 8 levels")
    out = []
    for v in data:
        out.extend(_flat(v, depth + 1) if isinstance(v, list) else [v])
    return out


def _requested(body: dict) -> tuple[list[str], bool]:
    """(requested output names, whether the answer is binary)."""
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadInputError("'parameters' must be an object")
    binary = params.get("binary_data_output") is True
    outputs = body.get("outputs")
    if outputs is None:
        return [], binary
    if not isinstance(outputs, list):
        raise BadInputError("'outputs' must be a list of {\"name\": …} objects")
    names = []
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadInputError("each of 'outputs' must be an object with a 'name'")
        names.append(o["name"])
        p = o.get("parameters") or {}
        if isinstance(p, dict) and p.get("binary_data") is True:
            binary = True
    return names, binary


def _parse_infer(raw: bytes, header_length: str | None, max_elements: int):
    """The infer body → (body, tensors, requested outputs, binary answer); runs in a worker thread."""
    body, binary = _split(raw, header_length, max_elements)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInputError("'inputs' must be a non-empty list of tensors")
    tensors, pos = [], 0
    for spec in inputs:
        t, pos = _tensor(spec, binary, pos, max_elements)
        tensors.append(t)
    if pos != len(binary):
        raise BadInputError(f"{len(binary) - pos} bytes of binary data after the last binary input")
    requested, binary_out = _requested(body)
    return body, tensors, requested, binary_out


async def _infer(service: DiagnosisAPI, request: Request, model: str, version: str | None) -> Response:
    raw = await checks.read_body(request)  # bounded: BodyLimitMiddleware refuses a body above max_body_bytes
    # JSON parsing and tensor building off the event loop, within the element cap
    body, tensors, requested, binary_out = await run_in_threadpool(
        _parse_infer, raw, request.headers.get(HEADER_LENGTH), service.limits.max_json_elements)
    result = await kserve.infer(service, model, version, tensors, requested)
    probs = result.probabilities
    out: dict = {"name": kserve.OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    answer: dict = {"model_name": result.model_name, "model_version": result.model_version,
                    "parameters": result.parameters}
    if isinstance(body.get("id"), str):
        answer["id"] = body["id"]
    if not binary_out:
        out["data"] = [float(x) for x in probs.reshape(-1)]
        answer["outputs"] = [out]
        return JSONResponse(answer)
    data = probs.astype("<f4").tobytes()
    out["parameters"] = {"binary_data_size": len(data)}
    answer["outputs"] = [out]
    header = json.dumps(answer).encode()
    return Response(header + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})

