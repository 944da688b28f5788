"""The gRPC API (grpc.aio): the Medlego service, the standard health service and server reflection.

:class:`MedlegoRPC` holds the operations as proto-in / proto-out coroutines that raise
:class:`MedlegoError`; :class:`MedlegoServicer` maps those errors to gRPC status codes. The Ray
deployment calls the same :class:`MedlegoRPC` from Ray Serve's gRPC proxy.
"""

from __future__ import annotations

import json
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from medlego.runtime.errors import BadInputError, MedlegoError

from . import medlego_pb2 as pb
from . import medlego_pb2_grpc as pb_grpc
from .service import DiagnoseItem, DiagnosisService, call

log = logging.getLogger("medlego.serving")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Medlego"].full_name  # "medlego.v1.Medlego"

STATUS_TO_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_code(e: BaseException) -> grpc.StatusCode:
    if isinstance(e, MedlegoError):
        return STATUS_TO_CODE.get(e.status, grpc.StatusCode.INVALID_ARGUMENT if e.status < 500 else grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


# -- proto conversions ---------------------------------------------------------------------------
def diagnosis_proto(d: dict) -> pb.DiagnoseResponse:
    return pb.DiagnoseResponse(
        adapter=d["adapter"] or "", version=d["version"] or 0, sha256=d["sha256"] or "", task=d["task"] or "",
        multilabel=bool(d.get("multilabel")), probabilities=d["probabilities"] or {},
        top=[pb.Label(label=t["label"], probability=t["probability"]) for t in d["top"] or []],
        timings_ms=d.get("timings_ms") or {}, replica=d.get("replica", ""))


_INFO_FIELDS = {"name", "version", "ref", "sha256", "size", "created", "pinned", "tasks", "aliases", "max_rank"}


def adapter_proto(desc: dict) -> pb.AdapterInfo:
    rest = {k: v for k, v in desc.items() if k not in _INFO_FIELDS}
    return pb.AdapterInfo(
        name=desc["name"], version=desc["version"], ref=desc["ref"], sha256=desc["sha256"], size=desc["size"],
        created=desc["created"], pinned=desc["pinned"],
        tasks=[pb.Task(name=t["name"], labels=t["labels"], multilabel=t.get("multilabel", False)) for t in desc["tasks"]],
        aliases=desc.get("aliases", []), max_rank=int(desc.get("max_rank") or 0),
        metadata_json=json.dumps(rest, sort_keys=True, default=str))


def authorization_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


def _item(req: pb.DiagnoseRequest) -> DiagnoseItem:
    return DiagnoseItem(image=bytes(req.image), adapter=req.adapter, task=req.task or None, top_k=req.top_k or None)


class MedlegoRPC:
    """The operations, transport-free: (proto request, authorization) → proto response."""

    def __init__(self, service: DiagnosisService):
        self.service = service

    async def Diagnose(self, req: pb.DiagnoseRequest, authorization: str | None) -> pb.DiagnoseResponse:
        self.service.auth.check_api(authorization)
        d = await self.service.diagnose(_item(req), api="grpc")
        return diagnosis_proto(self.service.diagnosis_json(d))

    async def DiagnoseBatch(self, req: pb.DiagnoseBatchRequest, authorization: str | None) -> pb.DiagnoseBatchResponse:
        self.service.auth.check_api(authorization)
        results = await self.service.diagnose_many([_item(r) for r in req.items], api="grpc")
        return pb.DiagnoseBatchResponse(results=[diagnosis_proto(self.service.diagnosis_json(d)) for d in results])

    async def ListAdapters(self, req: pb.ListAdaptersRequest, authorization: str | None) -> pb.ListAdaptersResponse:
        self.service.auth.check_api(authorization)
        listing = await call(self.service.list_adapters)
        return pb.ListAdaptersResponse(adapters=[adapter_proto(a) for a in listing["adapters"]], aliases=listing["aliases"])

    async def DescribeAdapter(self, req: pb.DescribeAdapterRequest, authorization: str | None) -> pb.AdapterInfo:
        self.service.auth.check_api(authorization)
        if not req.ref:
            raise BadInputError("'ref' is required: NAME, NAME@VERSION or an alias")
        return adapter_proto(await call(self.service.describe, req.ref))

    async def RegisterAdapter(self, req: pb.RegisterAdapterRequest, authorization: str | None) -> pb.AdapterInfo:
        self.service.auth.check_admin(authorization)
        return adapter_proto(await call(self.service.register, req.name, bytes(req.data), list(req.aliases)))

    async def DeleteAdapter(self, req: pb.DeleteAdapterRequest, authorization: str | None) -> pb.DeleteAdapterResponse:
        self.service.auth.check_admin(authorization)
        return pb.DeleteAdapterResponse(deleted=await call(self.service.delete, req.ref))

    async def Health(self, req: pb.HealthRequest, authorization: str | None) -> pb.HealthResponse:
        h = await call(self.service.health)
        return pb.HealthResponse(alive=True, ready=h["ready"], adapters=max(0, h["adapters"]), device=h["device"])


RPC_NAMES = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["Medlego"].methods)


class MedlegoServicer(pb_grpc.MedlegoServicer):
    """grpc.aio servicer: reads the bearer token from metadata, maps errors to status codes."""

    def __init__(self, rpc: MedlegoRPC):
        self.rpc = rpc

    async def _call(self, name: str, request, context: grpc.aio.ServicerContext):
        try:
            return await getattr(self.rpc, name)(request, authorization_of(context.invocation_metadata()))
        except MedlegoError as e:
            await context.abort(grpc_code(e), str(e))
        except Exception:
            log.exception("internal error in %s", name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")


def _bind(name: str):
    async def method(self, request, context):
        return await self._call(name, request, context)

    method.__name__ = name
    return method


for _name in RPC_NAMES:
    setattr(MedlegoServicer, _name, _bind(_name))


def build_grpc_server(service: DiagnosisService, host: str, port: int) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """A grpc.aio server (not started) with Medlego, health and reflection; returns (server, bound port, health)."""
    limit = max(service.limits.max_body_bytes, service.limits.max_adapter_bytes + 1024 * 1024)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_MedlegoServicer_to_server(MedlegoServicer(MedlegoRPC(service)), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server, bound, health


async def set_serving(health: HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health.set("", status)
    await health.set(SERVICE_NAME, status)
