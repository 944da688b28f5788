"""The engine replica of the Ray Serve application, and what crosses the actor boundary to it.

``MedlegoReplica`` (N replicas): one :class:`~.service.DiagnosisService` (engine + mixed-adapter
:class:`DynamicBatcher`) each. Its adapter loader is ``@serve.multiplexed``, so Ray's router sends
a request to a replica that already holds the request's adapter (replica affinity, a per-replica
LRU of adapter ids). Batching stays the project's own: Ray (2.60) splits every ``@serve.batch``
batch by multiplexed model id (``ray/serve/batching.py: _split_batch_by_model_id``; measured in
``benchmarks/ray_batch_split.py``: 8 ids → batches of 3.3 on average instead of 28.4), which would
hand the mixed-adapter engine single-adapter batches; our batcher batches across whatever adapters
the replica receives.

The ingress resolved the request's reference once (``ray_frontend.py``) and passes ``name@version``
(the multiplexed model id), its sha256 and pin flag: the replica serves the loader's host copy under
that identity and reads the registry again only when the loader holds other content.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

from ray import serve

from medlego.runtime.config import ServeConfig, config_from_dict
from medlego.runtime.errors import BadInputError, MedlegoError, error_class
from medlego.runtime.registry.audit import CURRENT

from .contract import ADMIN_OPERATIONS, DiagnoseItem
from .heap import freeze_startup_heap
from .ray_metrics import RayMetricsBridge
from .ray_resilience import EngineProbe, inject_fault
from .reads import off_loop
from .service import DiagnosisService

NODE_PLACEHOLDER = "{node}"


def on_this_node(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with ``{node}`` in the registry's cache dir replaced by this process's Ray node id.

    Objects are cached per node; nodes that share a filesystem would otherwise share (and evict
    from) one cache folder, and a node could not tell what it holds itself."""
    cache = cfg.registry.cache_dir
    if cache and NODE_PLACEHOLDER in cache:
        import ray

        cfg.registry.cache_dir = cache.replace(NODE_PLACEHOLDER, ray.get_runtime_context().get_node_id())
    return cfg


# -- errors across the actor boundary: plain records, not pickled exceptions with tracebacks ------
def error_record(e: MedlegoError, replica: str = "") -> dict:
    """`replica`: who refused (kept for logs and tests; the client's answer is the error alone)."""
    return {"error": {"type": type(e).__name__, "status": e.status, "grpc_code": e.grpc_code,
                      "outcome": e.outcome, "message": str(e), "replica": replica}}


def raise_record(record: dict) -> NoReturn:
    err = record["error"]
    cls = error_class(err["type"])
    if cls is None:  # a class this process does not know (another version): keep its answer
        cls = type(err["type"], (MedlegoError,), {"answer": (err["status"], err["grpc_code"], err["outcome"])})
    raise cls(err["message"])


def unwrap(result: Any) -> Any:
    """A replica's answer, or its error record raised as the error it was."""
    if isinstance(result, dict) and set(result) == {"error"}:
        raise_record(result)
    return result


# -- the request's audit context, from the ingress to the replica -------------------------------------
def request_context() -> dict:
    """The request's audit context at the ingress (its id, caller and front-door API), to travel with the
    call to a replica, whose audit rows then name the caller and the id the client was answered with."""
    return dict(CURRENT.get() or {})


def _enter(context: dict | None) -> None:
    """On a replica: the ingress's request context for this call (each call is its own asyncio task,
    so this stays with the call)."""
    if context:
        CURRENT.set(dict(context))


class _Held:
    """What the multiplexed loader caches per adapter id; dropping it marks the id as not held."""

    def __init__(self, held: set, model_id: str, resolved):
        self.held, self.model_id, self.resolved = held, model_id, resolved

    def for_route(self, route: dict | None):
        """The loaded adapter under the identity the ingress resolved (its pin flag is the fresh one), or
        None when the ingress resolved other content (then the service resolves the reference itself)."""
        if not route or route.get("sha256") != self.resolved.sha256:
            return None
        return dataclasses.replace(self.resolved, pinned=bool(route.get("pinned")))

    def __del__(self):
        self.held.discard(self.model_id)


@serve.deployment(name="MedlegoReplica", max_ongoing_requests=512, ray_actor_options={"num_cpus": 1},
                  logging_config={"enable_access_log": False})
class MedlegoReplica:
    def __init__(self, config: dict, torch_threads: int | None = None):
        import os

        import ray
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = on_this_node(config_from_dict(config))
        cfg.server.apply_switch_interval()  # this actor's process: decode threads beside its event loop
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # pid: what an operator needs to find this replica's process (/v1/info, from a replica)
        self.node = {"node_id": ray.get_runtime_context().get_node_id(), "cache_dir": cfg.registry.cache_dir,
                     "pid": os.getpid()}
        self.service = DiagnosisService.from_config(cfg, replica=self.replica_id)
        self.service.warmup()
        freeze_startup_heap()  # a replica process is only this server
        self.probe = EngineProbe(self.service)
        self._held: set[str] = set()
        self.requests = 0
        self.hits = 0
        self.bridge = RayMetricsBridge(self.service.engine.counters, self._gauges)

    def _gauges(self) -> dict:
        stats = self.service.engine.pool_stats()
        return {"pool_device_resident": stats["device_resident"], "pool_host_resident": stats["host_resident"],
                "multiplex_held": len(self._held), "multiplex_hit_ratio": self.hits / self.requests if self.requests else 0.0}

    @serve.multiplexed(max_num_models_per_replica=64)
    async def adapter(self, model_id: str) -> _Held:
        """Load an adapter (name@version) into this replica's host tier; Ray keeps an LRU of these."""
        resolved = await off_loop(self.service.engine.resolve, model_id)
        self._held.add(model_id)
        return _Held(self._held, model_id, resolved)

    async def diagnose(self, item: dict, api: str = "rest", context: dict | None = None,
                       route: dict | None = None) -> dict:
        """`route`: the ingress's resolve of ``item["adapter"]`` (its sha256 and pin flag)."""
        _enter(context)
        model_id = serve.get_multiplexed_model_id()
        hit = bool(model_id) and model_id in self._held
        try:
            resolved = (await self.adapter(model_id)).for_route(route) if model_id else None
            out = await self.service.diagnose(DiagnoseItem(**item, resolved=resolved), api=api)
        except MedlegoError as e:
            return error_record(e, self.replica_id)
        self.requests += 1
        self.hits += hit
        self.service.engine.counters.inc("multiplex_requests", hit=str(hit).lower())
        out["multiplex_hit"] = hit
        return out

    async def admin(self, op: str, *args, context: dict | None = None):
        _enter(context)
        if op not in ADMIN_OPERATIONS:
            return error_record(BadInputError(f"unknown admin operation '{op}'"), self.replica_id)
        try:
            return await getattr(self.service.admin, op)(*args)
        except MedlegoError as e:
            return error_record(e, self.replica_id)

    async def health(self) -> dict:
        self.bridge.sync()  # also proves the Ray metrics path works
        return {**await self.service.info(), "multiplex": {"requests": self.requests, "hits": self.hits,
                                                           "held": sorted(self._held)},
                "node": self.node,
                "ray_metrics": {"syncs": self.bridge.syncs, "last_error": self.bridge.last_error}}

    async def check_health(self) -> None:
        """Ray replaces this replica when this raises: the engine must still run a batch (ray_resilience.py)."""
        if not self.service.ready:
            raise RuntimeError("engine not warmed up")
        await self.probe.check()

    def inject_fault(self, kind: str) -> str:
        """Test hook, refused unless MEDLEGO_TEST_FAULTS=1 (ray_resilience.py); returns this replica's id."""
        inject_fault(self.service, kind)
        return self.replica_id
