"""The gRPC API (grpc.aio): the Medlego service, the standard health service and server reflection.

:class:`MedlegoRPC` holds the operations as proto-in / proto-out coroutines over the serving
contract (:class:`~.contract.DiagnosisAPI`). :class:`RpcMethods` gives a class one coroutine per
RPC of ``medlego.v1.Medlego`` that reads the bearer token from the call's metadata and answers a
failure with its error class's code (``runtime/errors.py``). The grpc.aio servicer here and the
Ray ingress (called by Ray Serve's gRPC proxy by RPC name) both are :class:`RpcMethods`: one code
path for the gRPC API in either mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from medlego.runtime.registry.audit import CURRENT
from medlego.runtime.errors import BadInputError, MedlegoError, answer_of

from . import medlego_pb2 as pb
from . import medlego_pb2_grpc as pb_grpc
from .contract import MAX_AUDIT_PAGE, DiagnoseItem, DiagnosisAPI, MergeSpec
from .limits import upload_limit, valid_request_id

log = logging.getLogger("medlego.serving")

_SERVICE = pb.DESCRIPTOR.services_by_name["Medlego"]
SERVICE_NAME = _SERVICE.full_name  # "medlego.v1.Medlego"
RPC_NAMES = tuple(m.name for m in _SERVICE.methods)
_RESPONSE_TYPES = {m.name: getattr(pb, m.output_type.name) for m in _SERVICE.methods}


# -- proto conversions ---------------------------------------------------------------------------
def diagnosis_proto(d: dict) -> pb.DiagnoseResponse:
    return pb.DiagnoseResponse(
        adapter=d["adapter"] or "", version=d["version"] or 0, sha256=d["sha256"] or "", task=d["task"] or "",
        multilabel=bool(d.get("multilabel")), probabilities=d["probabilities"] or {},
        top=[pb.Label(label=t["label"], probability=t["probability"]) for t in d["top"] or []],
        timings_ms=d.get("timings_ms") or {}, replica=d.get("replica", ""),
        rank_truncation=truncation_proto(d.get("rank_truncation")))


def truncation_proto(report: dict | None) -> pb.RankTruncation | None:
    """`adapter.truncate_rank`'s report (None: the adapter is served whole, the field stays unset)."""
    if not report:
        return None
    return pb.RankTruncation(rank=report["rank"], served_rank=report["served_rank"],
                             matrices_truncated=report["matrices_truncated"], dropped_mass=report["dropped_mass"],
                             max_matrix_dropped_mass=report["max_matrix_dropped_mass"])


_INFO_FIELDS = {"name", "version", "ref", "sha256", "size", "created", "pinned", "tasks", "aliases", "max_rank",
                "rank_truncation"}


def adapter_proto(desc: dict) -> pb.AdapterInfo:
    rest = {k: v for k, v in desc.items() if k not in _INFO_FIELDS}
    return pb.AdapterInfo(
        name=desc["name"], version=desc["version"], ref=desc["ref"], sha256=desc["sha256"], size=desc["size"],
        created=desc["created"], pinned=desc["pinned"],
        tasks=[pb.Task(name=t["name"], labels=t["labels"], multilabel=t.get("multilabel", False)) for t in desc["tasks"]],
        aliases=desc.get("aliases", []), max_rank=int(desc.get("max_rank") or 0),
        metadata_json=json.dumps(rest, sort_keys=True, default=str),
        rank_truncation=truncation_proto(desc.get("rank_truncation")))


def authorization_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def echo_request_id(context, rid: str) -> None:
    """The request id back to the client as trailing metadata (REST's X-Request-ID), answer or error."""
    setter = getattr(context, "set_trailing_metadata", None)
    if setter is not None:
        setter([("x-request-id", rid)])  # a list: Ray's gRPC context prepends its own list


def peer_host(context) -> str:
    """The caller's address without its port ("ipv4:10.0.0.7:51234" → "ipv4:10.0.0.7"), as REST's
    peer address: the decode pool's turn-taking key for a caller without a token (fair_pool.py)."""
    peer = getattr(context, "peer", None)
    try:
        address = peer() if callable(peer) else ""
    except Exception:  # noqa: BLE001 - a context without a peer (Ray's proxy): no address, one shared turn
        address = ""
    if not isinstance(address, str):
        return ""
    return address.rsplit(":", 1)[0] if address.startswith(("ipv4:", "ipv6:")) else address


def request_id_of(metadata) -> str:
    """The client's ``x-request-id`` metadata when valid (as REST's header), else a fresh id."""
    for key, value in metadata or ():
        if key == "x-request-id":
            value = value if isinstance(value, str) else value.decode("latin-1")
            if valid_request_id(value):
                return value
    return uuid.uuid4().hex


def _item(req: pb.DiagnoseRequest) -> DiagnoseItem:
    return DiagnoseItem(image=bytes(req.image), adapter=req.adapter, task=req.task or None, top_k=req.top_k or None)


def _params(text: str) -> dict:
    if not text:
        return {}
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):
        raise BadInputError("'params_json' is not valid JSON") from None
    if not isinstance(params, dict):
        raise BadInputError("'params_json' must be a JSON object")
    return params


class MedlegoRPC:
    """The operations, transport-free: (proto request, authorization) → proto response."""

    def __init__(self, api: DiagnosisAPI):
        self.api = api

    async def Diagnose(self, req: pb.DiagnoseRequest, authorization: str | None) -> pb.DiagnoseResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/Diagnose")
        return diagnosis_proto(await self.api.diagnose(_item(req), api="grpc"))

    async def DiagnoseBatch(self, req: pb.DiagnoseBatchRequest, authorization: str | None) -> pb.DiagnoseBatchResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/DiagnoseBatch")
        results = await self.api.diagnose_many([_item(r) for r in req.items], api="grpc")
        return pb.DiagnoseBatchResponse(results=[diagnosis_proto(d) for d in results])

    async def ListAdapters(self, req: pb.ListAdaptersRequest, authorization: str | None) -> pb.ListAdaptersResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/ListAdapters")
        listing = await self.api.list_adapters(req.limit or None, req.cursor, req.prefix, req.task, req.base)
        return pb.ListAdaptersResponse(adapters=[adapter_proto(a) for a in listing["adapters"]], aliases=listing["aliases"],
                                       next_cursor=listing.get("next_cursor", ""))

    async def DescribeAdapter(self, req: pb.DescribeAdapterRequest, authorization: str | None) -> pb.AdapterInfo:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/DescribeAdapter")
        return adapter_proto(await self.api.describe(req.ref))

    async def RegisterAdapter(self, req: pb.RegisterAdapterRequest, authorization: str | None) -> pb.AdapterInfo:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/RegisterAdapter")
        return adapter_proto(await self.api.admin.register(req.name, bytes(req.data), list(req.aliases), req.move_aliases))

    async def DeleteAdapter(self, req: pb.DeleteAdapterRequest, authorization: str | None) -> pb.DeleteAdapterResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/DeleteAdapter")
        return pb.DeleteAdapterResponse(deleted=await self.api.admin.delete(req.ref, req.all_versions))

    async def PinAdapter(self, req: pb.DescribeAdapterRequest, authorization: str | None) -> pb.AdapterInfo:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/PinAdapter")
        return adapter_proto(await self.api.admin.pin(req.ref))

    async def UnpinAdapter(self, req: pb.DescribeAdapterRequest, authorization: str | None) -> pb.AdapterInfo:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/UnpinAdapter")
        return adapter_proto(await self.api.admin.unpin(req.ref))

    async def ListAliases(self, req: pb.ListAliasesRequest, authorization: str | None) -> pb.ListAliasesResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/ListAliases")
        return pb.ListAliasesResponse(aliases=await self.api.aliases())

    async def SetAlias(self, req: pb.SetAliasRequest, authorization: str | None) -> pb.SetAliasResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/SetAlias")
        return pb.SetAliasResponse(**await self.api.admin.set_alias(req.alias, req.target))

    async def RemoveAlias(self, req: pb.RemoveAliasRequest, authorization: str | None) -> pb.RemoveAliasResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/RemoveAlias")
        await self.api.admin.remove_alias(req.alias)
        return pb.RemoveAliasResponse(removed=req.alias)

    async def MergeAdapters(self, req: pb.MergeAdaptersRequest, authorization: str | None) -> pb.AdapterInfo:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/MergeAdapters")
        spec = MergeSpec(req.name, list(req.sources), req.method or "med-lego", _params(req.params_json),
                         list(req.aliases), list(req.task_names) or None, req.move_aliases)
        return adapter_proto(await self.api.admin.merge(spec))

    async def Health(self, req: pb.HealthRequest, authorization: str | None) -> pb.HealthResponse:
        h = await self.api.health()
        return pb.HealthResponse(alive=True, ready=h["ready"], adapters=max(0, h["adapters"]), device=h.get("device", ""))

    async def Info(self, req: pb.InfoRequest, authorization: str | None) -> pb.InfoResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/Info")
        return pb.InfoResponse(info_json=json.dumps(await self.api.info(), sort_keys=True, default=str))

    async def QueryAudit(self, req: pb.AuditRequest, authorization: str | None) -> pb.AuditResponse:
        self.api.auth.check_route(authorization, "rpc medlego.v1.Medlego/QueryAudit")
        if req.limit > MAX_AUDIT_PAGE:  # as GET /v1/audit: the answer is built in one piece, so it is bounded
            raise BadInputError(f"'limit' must be at most {MAX_AUDIT_PAGE}")
        limit = req.limit or MAX_AUDIT_PAGE
        rows = await self.api.audit_rows(since=req.since or None, until=req.until or None, adapter=req.adapter or None,
                                         caller=req.caller or None, image_sha256=req.image_sha256 or None,
                                         kind=req.kind or None, limit=limit, after_seq=req.after)
        next_after = rows[-1]["seq"] if len(rows) == limit else 0  # REST's `next`: a full page may have a successor
        return await asyncio.get_running_loop().run_in_executor(  # serialised off the event loop
            None, lambda: pb.AuditResponse(rows_json=[json.dumps(r, sort_keys=True) for r in rows],
                                           next_after=next_after))


class RpcMethods:
    """One coroutine per RPC, over ``self.rpc``; a failure sets the call's code and details.

    The same methods serve grpc.aio (``context`` is its ServicerContext) and Ray Serve's gRPC
    proxy (which passes the ``grpc_context`` keyword): both honour a code set on the context.
    """

    rpc: MedlegoRPC

    async def _answer(self, name: str, request, context):
        metadata = context.invocation_metadata() if context is not None else ()
        rid = request_id_of(metadata)
        CURRENT.set({"id": rid, "api": "grpc", "client": peer_host(context)})
        echo_request_id(context, rid)
        try:
            return await getattr(self.rpc, name)(request, authorization_of(metadata))
        except Exception as e:
            _, code, _ = answer_of(e)
            if not isinstance(e, MedlegoError):
                log.error("internal error in %s", name, exc_info=e)
            if context is None:
                raise
            context.set_code(grpc.StatusCode[code])
            context.set_details(str(e) if isinstance(e, MedlegoError) else "internal server error")
            return _RESPONSE_TYPES[name]()


def _bind(name: str):
    async def method(self, request, grpc_context=None):
        return await self._answer(name, request, grpc_context)

    method.__name__ = method.__qualname__ = name
    return method


for _name in RPC_NAMES:
    setattr(RpcMethods, _name, _bind(_name))


class MedlegoServicer(RpcMethods, pb_grpc.MedlegoServicer):
    def __init__(self, rpc: MedlegoRPC):
        self.rpc = rpc


def build_grpc_server(api: DiagnosisAPI, host: str, port: int) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """A grpc.aio server (not started) with Medlego, health and reflection; returns (server, bound port, health)."""
    limit = upload_limit(api.limits)  # the same bound as REST's upload route
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      ("grpc.so_reuseport", 0)])
    from grpc_reflection.v1alpha import reflection_pb2

    from . import kserve_grpc, kserve_v2_pb2  # the Open Inference Protocol beside medlego.v1

    pb_grpc.add_MedlegoServicer_to_server(MedlegoServicer(MedlegoRPC(api)), server)
    kserve_grpc.add_kserve(server, api)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    pool = kserve_grpc.reflection_pool((pb.DESCRIPTOR, kserve_v2_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR,
                                        reflection_pb2.DESCRIPTOR))
    reflection.enable_server_reflection(
        (SERVICE_NAME, kserve_grpc.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server, pool=pool)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server, bound, health


async def set_serving(health: HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health.set("", status)
    await health.set(SERVICE_NAME, status)
    await health.set("inference.GRPCInferenceService", status)
