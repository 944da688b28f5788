"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` (``kserve.py``).

Served on the same grpc.aio server (same port) as ``medlego.v1.Medlego``, with reflection and
health. The token is the diagnosis API's, in the call's ``authorization: Bearer …`` metadata; a
failure answers with its error class's code (``runtime/errors.py``: INVALID_ARGUMENT, NOT_FOUND …).
Inputs come as ``contents`` or ``raw_input_contents``; the answer's tensor is in
``raw_output_contents`` (as Triton answers, and as clients read first).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from google.protobuf import descriptor_pool

from medlego.runtime.registry.audit import CURRENT
from medlego.runtime.errors import BadInputError, MedlegoError, PayloadTooLargeError, answer_of

from . import kserve
from .kserve_repository import index_page
from . import kserve_v2_pb2 as pb
from . import kserve_v2_pb2_grpc as pb_grpc
from .contract import DiagnosisAPI
from .grpc_service import authorization_of, echo_request_id, peer_host, request_id_of

log = logging.getLogger("medlego.serving")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"


def reflection_pool(files) -> descriptor_pool.DescriptorPool:
    """One pool with every served file, for server reflection: the v2 messages live in a pool of
    their own (``gen_proto``: clients register their own copy of ``inference.*`` in the default
    pool), the others in the default pool. Files are given dependencies first."""
    pool = descriptor_pool.DescriptorPool()
    for fd in files:
        pool.AddSerializedFile(fd.serialized_pb)
    return pool


def _param(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def _tensor(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, max_elements: int) -> kserve.Tensor:
    name = t.name
    shape = kserve.check_shape(name, list(t.shape))
    if kserve.elements(shape) > max_elements:  # as the REST body's element cap: a huge tensor costs its Python list
        raise PayloadTooLargeError(f"input '{name:.60}' has {kserve.elements(shape)} elements; "
                                   f"the limit is {max_elements}")
    if t.datatype == "BYTES":
        if raw is not None:
            return kserve.Tensor(name, "BYTES", shape, kserve.unpack_bytes(name, raw, kserve.elements(shape)))
        values = [bytes(b) for b in t.contents.bytes_contents]
        if len(values) != kserve.elements(shape):
            raise BadInputError(f"input '{name}': {len(values)} elements for shape {list(shape)}")
        return kserve.Tensor(name, "BYTES", shape, values)
    if t.datatype == "FP32":
        if raw is not None:
            return kserve.Tensor(name, "FP32", shape, kserve.fp32_from_raw(name, raw, shape))
        return kserve.Tensor(name, "FP32", shape, kserve.fp32_from_values(name, list(t.contents.fp32_contents), shape))
    raise BadInputError(f"input '{name:.60}': datatype must be BYTES or FP32, got {t.datatype!r:.40}")


def _tensors(request: pb.ModelInferRequest, max_elements: int) -> list[kserve.Tensor]:
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise BadInputError(f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs; give one per input")
    return [_tensor(t, bytes(raws[i]) if raws else None, max_elements) for i, t in enumerate(request.inputs)]


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, api: DiagnosisAPI):
        self.api = api

    async def _call(self, name: str, context, fn, empty):
        rid = request_id_of(context.invocation_metadata())
        CURRENT.set({"id": rid, "api": "v2", "client": peer_host(context)})
        echo_request_id(context, rid)
        try:
            return await fn(authorization_of(context.invocation_metadata()))
        except Exception as e:
            _, code, _ = answer_of(e)
            if not isinstance(e, MedlegoError):
                log.error("internal error in %s", name, exc_info=e)
            context.set_code(grpc.StatusCode[code])
            context.set_details(kserve.error_message(e))
            return empty

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await kserve.server_ready(self.api))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=kserve.SERVER_NAME, version=kserve.server_version(),
                                         extensions=list(kserve.EXTENSIONS))

    async def ModelReady(self, request, context):
        async def run(authorization):
            self.api.auth.check_route(authorization, "rpc inference.GRPCInferenceService/ModelReady")
            try:
                return pb.ModelReadyResponse(ready=await kserve.model_ready(self.api, request.name, request.version))
            except MedlegoError as e:
                if answer_of(e)[1] == "NOT_FOUND":  # as Triton: an unknown model is not ready
                    return pb.ModelReadyResponse(ready=False)
                raise
        return await self._call("ModelReady", context, run, pb.ModelReadyResponse())

    async def ModelMetadata(self, request, context):
        async def run(authorization):
            self.api.auth.check_route(authorization, "rpc inference.GRPCInferenceService/ModelMetadata")
            m = await kserve.model_metadata(self.api, request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=m["name"], versions=m["versions"], platform=m["platform"],
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in m["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in m["outputs"]],
                parameters={k: _param(v) for k, v in m["parameters"].items()})
        return await self._call("ModelMetadata", context, run, pb.ModelMetadataResponse())

    async def ModelInfer(self, request, context):
        async def run(authorization):
            self.api.auth.check_route(authorization, "rpc inference.GRPCInferenceService/ModelInfer")
            # tensors built off the event loop (a 30 MB fp32_contents is millions of Python floats), capped
            tensors = await asyncio.get_running_loop().run_in_executor(
                None, _tensors, request, self.api.limits.max_json_elements)
            result = await kserve.infer(self.api, request.model_name, request.model_version, tensors,
                                        [o.name for o in request.outputs])
            probs = result.probabilities
            out = pb.ModelInferResponse.InferOutputTensor(name=kserve.OUTPUT, datatype="FP32", shape=list(probs.shape))
            return pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version,
                                         id=request.id, outputs=[out],
                                         parameters={k: _param(v) for k, v in result.parameters.items()},
                                         raw_output_contents=[np.ascontiguousarray(probs, dtype="<f4").tobytes()])
        return await self._call("ModelInfer", context, run, pb.ModelInferResponse())

    async def RepositoryIndex(self, request, context):
        async def run(authorization):
            self.api.auth.check_route(authorization, "rpc inference.GRPCInferenceService/RepositoryIndex")
            if request.repository_name:
                raise BadInputError(f"repository {request.repository_name!r:.60}: this server has one repository; "
                                    "leave repository_name empty")
            index, cursor = await index_page(self.api, request.limit or None, request.cursor or None,
                                             request.prefix or None, request.task or None, request.base or None)
            entry = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(models=[entry(**e) for e in index], next_cursor=cursor or "")
        return await self._call("RepositoryIndex", context, run, pb.RepositoryIndexResponse())


def add_kserve(server: grpc.aio.Server, api: DiagnosisAPI) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(api), server)


RPC_NAMES = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)


class KServeMethods:
    """The v2 RPCs by name over ``self.kserve`` (a :class:`KServeServicer`), for Ray Serve's gRPC
    proxy, which calls the ingress's method named after the RPC with a ``grpc_context``."""

    kserve: KServeServicer


def _bind(name: str):
    async def method(self, request, grpc_context=None):
        return await getattr(self.kserve, name)(request, grpc_context)

    method.__name__ = method.__qualname__ = name
    return method


for _name in RPC_NAMES:
    setattr(KServeMethods, _name, _bind(_name))
