"""The Ray ingress: the serving contract over the replica deployment, and the deployment that serves it.

``MedlegoIngress`` (FastAPI ingress, no engine) serves the same REST app as the embedded server
(:func:`~.app.create_app` over :class:`RayFrontend`), plus the gRPC methods for Ray's gRPC proxy.
:class:`RayFrontend` reads the shared registry itself (listings, descriptions, audit rows; a 404
costs no replica call). A diagnosis is resolved here, once: ``name@version`` is the multiplexed
model id (so clients need no routing header) and travels to the replica with its sha256 and pin
flag (``ray_replica.py``). Admin writes go to a replica (it validates uploads against its resident
base); every replica reads the same registry, so a registration is live everywhere. What is refused
here never reaches a replica, so the ingress records those audit rows itself (``audit_recorder.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from medlego.runtime.config import ServeConfig, config_from_dict
from medlego.runtime.counters import Counters
from medlego.runtime.errors import BadInputError, MedlegoError
from medlego.runtime.registry import Registry
from medlego.runtime.registry import audit as audit_log

from . import limits as checks
from .audit_recorder import AuditRecorder, outcome_of
from .auth import Auth
from .contract import ADMIN_OPERATIONS, DiagnoseItem, MergeSpec, item_error
from .grpc_service import MedlegoRPC, RpcMethods
from .kserve_grpc import KServeMethods, KServeServicer
from .metrics import CountersOnlyCollector, render
from .ray_metrics import RayMetricsBridge
from .ray_resilience import once_more
from .ray_replica import on_this_node, request_context, unwrap
from .reads import RegistryReads, off_loop


def serve_request_id() -> str:
    """The request id Ray's HTTP proxy answers with (the client's ``X-Request-ID``, or one it made).

    Ray (2.60) has no public accessor for it: of the request context only the multiplexed model id is
    public (``serve.get_multiplexed_model_id()``), the rest is the private
    ``ray.serve.context._get_serve_request_context()``. This wrapper is the one place that reads it;
    should Ray move it, the audit falls back to an id of its own ("" here) and the proxy still answers
    with its header."""
    try:
        from ray.serve import context

        return context._get_serve_request_context().request_id
    except (ImportError, AttributeError):
        return ""


def _mark_audited() -> None:
    """A replica records this request's row (answer or error): the ingress's refusal recorder skips it."""
    current = audit_log.CURRENT.get()
    if current is not None:
        current["audited"] = True


class RayAdmin:
    """The registry writes, each run on a replica (it validates uploads against its resident base)."""

    def __init__(self, replicas, limits):
        self.replicas = replicas
        self.limits = limits

    async def _on_replica(self, op: str, *args):
        assert op in ADMIN_OPERATIONS
        context = request_context()
        _mark_audited()
        return unwrap(await self.replicas.admin.remote(op, *args, context=context))

    async def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool = False) -> dict:
        checks.check_adapter_bytes(self.limits, data)
        return await self._on_replica("register", name, data, list(aliases), move_aliases)

    async def delete(self, ref: str, all_versions: bool = False) -> list[str]:
        return await self._on_replica("delete", ref, all_versions)

    async def pin(self, ref: str) -> dict:
        return await self._on_replica("pin", ref)

    async def unpin(self, ref: str) -> dict:
        return await self._on_replica("unpin", ref)

    async def set_alias(self, alias: str, target: str) -> dict:
        return await self._on_replica("set_alias", alias, target)

    async def remove_alias(self, alias: str) -> None:
        await self._on_replica("remove_alias", alias)

    async def merge(self, spec: MergeSpec) -> dict:
        return await self._on_replica("merge", spec)


# A diagnosis goes to its replica by value, over the replica's own gRPC server, rather than as a Ray
# actor task (ObjectRefs, the owner's bookkeeping): with direct ingress, Ray's fixed cost per request at
# light load fell from 7.4 to 3.2 ms with it (ray_overhead.md). That server takes messages up to Ray's
# RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH (4 MiB by default), so a larger image goes by reference.
BY_VALUE_MAX_BYTES = 3 << 20


def payload_bytes(item: DiagnoseItem) -> int:
    """The bytes a diagnosis carries to its replica: the encoded image, or the pixels sent instead."""
    return len(item.image or b"") + int(getattr(item.pixels, "nbytes", 0))


def replica_handle(replicas, model_id: str, payload: int):
    """The replica deployment's handle for one diagnosis of `payload` bytes, routed by its adapter."""
    return replicas.options(multiplexed_model_id=model_id, _by_reference=payload > BY_VALUE_MAX_BYTES)


class RayFrontend(RegistryReads):
    """The serving contract backed by the replica deployment: reads from the shared registry, the rest on replicas."""

    def __init__(self, replicas, cfg: ServeConfig):
        from prometheus_client import CollectorRegistry

        self.replicas = replicas
        self.limits = cfg.limits
        self.auth = Auth.from_config(cfg.auth)
        # reads only; writes are validated by a replica, which holds the base
        self.registry = Registry(cfg.data_dir, **on_this_node(cfg).registry.registry_kwargs())
        log_ = (audit_log.AuditLog(self.registry.index, cfg.audit, store=self.registry.store)
                if cfg.audit.enabled else None)
        self.recorder = AuditRecorder(log_, self.auth)
        self.admin = RayAdmin(replicas, self.limits)
        self.counters = Counters()
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(CountersOnlyCollector(self.counters))
        self.bridge = RayMetricsBridge(self.counters)

    def close(self) -> None:
        self.recorder.close()  # what is still buffered is written before the ingress goes

    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> dict:
        t0 = time.perf_counter()
        routed = False
        try:
            ref = checks.check_text(item.adapter, "adapter")
            if ref is None:
                raise BadInputError("'adapter' is required: a registered name, name@version or alias")
            # the request's one resolve: one indexed read of the shared registry
            entry = await off_loop(self.registry.resolve, ref)
            handle = replica_handle(self.replicas, entry.ref, payload_bytes(item))
            fields = {"image": item.image, "adapter": entry.ref, "task": item.task, "top_k": item.top_k,
                      "pixels": item.pixels}
            context = request_context()
            routed = True  # from here on the replica audits the request, answer or error
            _mark_audited()
            route = {"sha256": entry.sha256, "pinned": entry.pinned}
            # idempotent: sent once more if its replica dies meanwhile (ray_resilience.py)
            out = unwrap(await once_more(lambda: handle.diagnose.remote(fields, api, context, route), self.counters))
        except MedlegoError as e:
            self.counters.inc("requests", adapter="", task="", outcome=outcome_of(e), api=api)
            if not routed:
                self.recorder.unrouted(item, api, e, t0)
            raise
        self.counters.inc("requests", adapter=out["adapter"], task=out["task"], outcome="ok", api=api)
        self.counters.observe("request_seconds", time.perf_counter() - t0, api=api)
        out.setdefault("timings_ms", {})["ingress_total"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    async def diagnose_many(self, items: list[DiagnoseItem], api: str = "rest") -> list[dict]:
        checks.check_batch(self.limits, len(items))
        results = await asyncio.gather(*[self.diagnose(it, api) for it in items], return_exceptions=True)
        for n, r in enumerate(results):
            if isinstance(r, BaseException):
                raise item_error(n, len(items), r) from None
        return results  # type: ignore[return-value]

    def refused_at(self, status: int, **fields: Any) -> None:
        """A request refused here by a stage no recorder saw (body limit, parsing, routing)."""
        self.recorder.refused_at(status, **fields)

    async def health(self) -> dict:
        try:
            h = await self.replicas.health.remote()
        except Exception as e:  # no replica up yet
            return {"alive": True, "ready": False, "adapters": -1, "device": "", "error": str(e).splitlines()[0]}
        return {k: v for k, v in h.items() if k in ("alive", "ready", "adapters", "device", "model", "input_size",
                                                    "fingerprint")}

    async def info(self) -> dict:
        return await self.replicas.health.remote()

    async def metrics_text(self) -> bytes:
        note = (b"# Ray mode: these are the ingress's request counters; engine, pool and batch metrics of\n"
                b"# every replica are exported through Ray's metrics endpoint as ray_medlego_*.\n")
        return note + render(self.metrics)


@serve.deployment(name="MedlegoIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
@serve.ingress()
class MedlegoIngress(RpcMethods, KServeMethods):
    """The REST app over HTTP (with /v2), and the gRPC methods (by RPC name) for Ray Serve's gRPC
    proxy: medlego.v1's and the Open Inference Protocol's (``inference.GRPCInferenceService``)."""

    def __init__(self, replicas, config: dict):
        cfg = config_from_dict(config)
        cfg.server.apply_switch_interval()  # this actor's process: its event loop shares the lock with threads
        self.frontend = RayFrontend(replicas, cfg)
        self.rpc = MedlegoRPC(self.frontend)
        self.kserve = KServeServicer(self.frontend)

    def __del__(self):  # Ray Serve's shutdown of a replica: the buffered audit rows first
        frontend = getattr(self, "frontend", None)
        if frontend is not None:
            frontend.close()

    def __serve_build_asgi_app__(self):
        from .app import create_app

        # Ray's HTTP proxy answers with X-Request-ID itself (the client's, or one it made): the audit uses that one
        return create_app(self.frontend, title="medlego (Ray Serve)", transport_request_id=serve_request_id)
