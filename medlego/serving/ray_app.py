"""Ray Serve: the same engine, REST routes and gRPC service, scaled over replicas with adapter affinity.

Two deployments:

* ``MedlegoReplica`` (N replicas): one engine + mixed-adapter :class:`DynamicBatcher` each. Its
  adapter loader is ``@serve.multiplexed``, so Ray's router sends a request to a replica that
  already holds the request's adapter (replica affinity, per-replica LRU of adapter ids).
  Batching stays the project's own: the installed Ray (2.60) splits every ``@serve.batch``
  batch by multiplexed model id (``ray/serve/batching.py: _split_batch_by_model_id``; measured
  in ``benchmarks/ray_batch_split.py``: 8 ids → batches of 3.3 on average instead of 28.4),
  which would hand the mixed-adapter engine single-adapter batches; our batcher inside the
  replica batches across whatever adapters the replica receives.
* ``MedlegoIngress`` (FastAPI ingress, no engine): the same REST app as the embedded server
  (:func:`create_app` over :class:`RayFrontend`), plus the gRPC methods for Ray's gRPC proxy. It
  resolves each request's adapter to ``name@version`` in the shared registry (a 404 costs no
  replica call) and calls the replicas with that as the multiplexed model id, so clients need
  no routing header. Admin writes go to a replica (it validates uploads against its resident
  base); every replica reads the same registry, so a registration is live everywhere.

A fleet: the registry is a PostgreSQL index + an S3 store (``registry_url``, ``registry_store``),
and every replica reads objects through its node-local cache (``registry_cache_dir``). A
``{node}`` in the cache dir is replaced, in each process, by its Ray node id, so nodes that share
a filesystem (two nodes on one machine, an NFS home) still keep one cache each. Replicas scale
with Ray's autoscaling (``autoscaling``) and can be placed by custom resources
(``replica_resources``); see :func:`app_builder` and ``serving/ray_config.yaml``.

Answers carry ``replica`` and ``multiplex_hit`` (whether the adapter was already loaded on the
replica that answered). Engine counters are mirrored into Ray's metrics (``ray_medlego_*``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from ray import serve

from medlego.runtime.registry import audit as audit_log
from medlego.runtime.registry.audit import CURRENT
from medlego.runtime.config import ServeConfig, ServerConfig, config_from_dict, config_to_dict
from medlego.runtime.counters import Counters
from medlego.runtime.errors import BadInputError, MedlegoError, error_class
from medlego.runtime.registry import Registry

from . import limits as checks
from .auth import Auth
from .contract import ADMIN_OPERATIONS, DiagnoseItem, MergeSpec, item_error
from .grpc_service import MedlegoRPC, RpcMethods
from .kserve_grpc import KServeMethods, KServeServicer
from .metrics import CountersOnlyCollector, render
from .service import DiagnosisService, RegistryReads, image_fields, outcome_of

log = logging.getLogger("medlego.serving")

APP_NAME = "medlego"
GRPC_SERVICER = "medlego.serving.medlego_pb2_grpc.add_MedlegoServicer_to_server"
GRPC_SERVICER_V2 = "medlego.serving.kserve_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
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


def raise_record(record: dict):
    err = record["error"]
    cls = error_class(err["type"])
    if cls is None:  # a class this process does not know (another version): keep its answer
        cls = type(err["type"], (MedlegoError,), {"answer": (err["status"], err["grpc_code"], err["outcome"])})
    raise cls(err["message"])


def unwrap(result):
    if isinstance(result, dict) and set(result) == {"error"}:
        raise_record(result)
    return result


# -- Ray metrics ----------------------------------------------------------------------------------
class RayMetricsBridge:
    """Mirror a Counters object into Ray's metrics every few seconds (counters as deltas).

    Histograms are exported the way Prometheus stores them: ``<name>_bucket{le=...}``,
    ``<name>_count`` and ``<name>_sum`` counters.
    """

    def __init__(self, counters: Counters, extra_gauges=None, period_s: float = 5.0):
        self.counters = counters
        self.extra_gauges = extra_gauges or (lambda: {})
        self.period_s = period_s
        self._last: dict = {}
        self._metrics: dict = {}
        self._lock = threading.Lock()
        self.syncs = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medlego-ray-metrics", daemon=True)
        self._thread.start()

    def _metric(self, kind, name: str, keys: tuple[str, ...]):
        from ray.serve import metrics as ray_metrics

        key = (kind, name, keys)
        if key not in self._metrics:
            cls = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge}[kind]
            self._metrics[key] = cls(f"medlego_{name}", description=f"medlego {name}", tag_keys=keys)
        return self._metrics[key]

    def _add(self, name: str, labels: dict, value: float) -> None:
        k = (name, tuple(sorted(labels.items())))
        delta = value - self._last.get(k, 0.0)
        self._last[k] = value
        if delta > 0:
            self._metric("counter", name, tuple(sorted(labels))).inc(delta, tags={k2: str(v) for k2, v in labels.items()} or None)

    def sync(self) -> None:
        with self._lock:
            try:
                self._sync()
                self.syncs += 1
                self.last_error = None
            except Exception as e:  # metrics must never take a replica down
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("syncing Ray metrics failed: %s", self.last_error)

    def _sync(self) -> None:
        snap = self.counters.snapshot()
        for (name, labels), value in snap["counters"].items():
            self._add(f"{name}_total", dict(labels), value)
        for (name, labels), (count, total, cumulative, bounds) in snap["observations"].items():
            labels = dict(labels)
            self._add(f"{name}_count", labels, count)
            self._add(f"{name}_sum", labels, total)
            for b, c in zip(bounds, cumulative):
                self._add(f"{name}_bucket", {**labels, "le": str(float(b))}, c)
            self._add(f"{name}_bucket", {**labels, "le": "+Inf"}, count)
        gauges = {name: (dict(labels), v) for (name, labels), v in snap["gauges"].items()}
        for name, (labels, v) in list(gauges.items()) + [(n, ({}, v)) for n, v in self.extra_gauges().items()]:
            self._metric("gauge", name, tuple(sorted(labels))).set(float(v), tags={k: str(x) for k, x in labels.items()} or None)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sync()

    def stop(self) -> None:
        self._stop.set()


# -- the engine replica -----------------------------------------------------------------------------
class _Held:
    """What the multiplexed loader caches per adapter id; dropping it marks the id as not held."""

    def __init__(self, held: set, model_id: str, resolved):
        self.held, self.model_id, self.resolved = held, model_id, resolved

    def __del__(self):
        self.held.discard(self.model_id)


def _context() -> dict:
    """The request's audit context at the ingress (its id, caller and front-door API), to travel with the
    call to a replica, whose audit rows then name the caller and the id the client was answered with."""
    return dict(CURRENT.get() or {})


def _enter(context: dict | None) -> None:
    """On a replica: the ingress's request context for this call (each call is its own asyncio task,
    so this stays with the call)."""
    if context:
        CURRENT.set(dict(context))


@serve.deployment(name="MedlegoReplica", max_ongoing_requests=512, ray_actor_options={"num_cpus": 1})
class MedlegoReplica:
    def __init__(self, config: dict, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        import ray

        cfg = on_this_node(config_from_dict(config))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node = {"node_id": ray.get_runtime_context().get_node_id(), "cache_dir": cfg.registry.cache_dir}
        self.service = DiagnosisService.from_config(cfg, replica=self.replica_id)
        self.service.warmup()
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
        loop = asyncio.get_running_loop()
        resolved = await loop.run_in_executor(None, self.service.engine.resolve, model_id)
        self._held.add(model_id)
        return _Held(self._held, model_id, resolved)

    async def diagnose(self, item: dict, api: str = "rest", context: dict | None = None) -> dict:
        _enter(context)
        model_id = serve.get_multiplexed_model_id()
        hit = bool(model_id) and model_id in self._held
        try:
            if model_id:
                await self.adapter(model_id)
            out = await self.service.diagnose(DiagnoseItem(**item), api=api)
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
            return await getattr(self.service, op)(*args)
        except MedlegoError as e:
            return error_record(e, self.replica_id)

    async def health(self) -> dict:
        self.bridge.sync()  # also proves the Ray metrics path works
        return {**await self.service.info(), "multiplex": {"requests": self.requests, "hits": self.hits,
                                                           "held": sorted(self._held)},
                "node": self.node,
                "ray_metrics": {"syncs": self.bridge.syncs, "last_error": self.bridge.last_error}}

    def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError("engine not warmed up")


# -- the ingress --------------------------------------------------------------------------------------
class RayFrontend(RegistryReads):
    """The serving contract backed by the replica deployment: reads from the shared registry, the rest on replicas."""

    def __init__(self, replicas, cfg: ServeConfig):
        from prometheus_client import CollectorRegistry

        self.replicas = replicas
        self.limits = cfg.limits
        self.auth = Auth.from_config(cfg.auth)
        # reads only; writes are validated by a replica, which holds the base
        self.registry = Registry(cfg.data_dir, **on_this_node(cfg).registry.registry_kwargs())
        # what is refused here never reaches a replica, so the ingress writes those audit rows itself
        self.audit = (audit_log.AuditLog(self.registry.index, cfg.audit, store=self.registry.store)
                      if cfg.audit.enabled else None)
        if self.audit is not None:
            self.auth.hooks["refused"] = self._refused
        self.counters = Counters()
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(CountersOnlyCollector(self.counters))
        self.bridge = RayMetricsBridge(self.counters)

    def _refused(self, caller: str, action: str, reason: str) -> None:
        assert self.audit is not None
        current = CURRENT.get() or {}
        self.audit.record("refused", request_id=current.get("id") or uuid.uuid4().hex, caller=caller,
                          api=current.get("api", ""), action=action, reason=reason, outcome="refused")

    def _audit_unrouted(self, item: DiagnoseItem, api: str, error: MedlegoError, t0: float) -> None:
        """A diagnosis that failed before any replica saw it (a bad or unknown reference)."""
        if self.audit is None:
            return
        current = CURRENT.get() or {}
        self.audit.record("refused", request_id=current.get("id") or uuid.uuid4().hex, caller=current.get("caller", ""),
                          api=api, adapter="", adapter_sha256="", requested=str(item.adapter)[:256], task=item.task or "",
                          **image_fields(item), latency_ms=round((time.perf_counter() - t0) * 1000, 3),
                          outcome=outcome_of(error), reason=str(error))

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()  # what is still buffered is written before the ingress goes

    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> dict:
        t0 = time.perf_counter()
        routed = False
        try:
            ref = checks.check_text(item.adapter, "adapter")
            if ref is None:
                raise BadInputError("'adapter' is required: a registered name, name@version or alias")
            # the routing key is the resolved name@version: one indexed read of the shared registry
            model_id = (await asyncio.get_running_loop().run_in_executor(None, self.registry.resolve, ref)).ref
            handle = self.replicas.options(multiplexed_model_id=model_id)
            fields = {"image": item.image, "adapter": model_id, "task": item.task, "top_k": item.top_k,
                      "pixels": item.pixels}
            routed = True  # from here on the replica audits the request, answer or error
            out = unwrap(await handle.diagnose.remote(fields, api, _context()))
        except MedlegoError as e:
            self.counters.inc("requests", adapter="", task="", outcome=outcome_of(e), api=api)
            if not routed:
                self._audit_unrouted(item, api, e, t0)
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

    # writes: on a replica (it validates uploads against its resident base)
    async def _admin(self, op: str, *args):
        assert op in ADMIN_OPERATIONS
        return unwrap(await self.replicas.admin.remote(op, *args, context=_context()))

    async def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool = False) -> dict:
        checks.check_adapter_bytes(self.limits, data)
        return await self._admin("register", name, data, list(aliases), move_aliases)

    async def delete(self, ref: str, all_versions: bool = False) -> list[str]:
        return await self._admin("delete", ref, all_versions)

    async def pin(self, ref: str) -> dict:
        return await self._admin("pin", ref)

    async def unpin(self, ref: str) -> dict:
        return await self._admin("unpin", ref)

    async def set_alias(self, alias: str, target: str) -> dict:
        return await self._admin("set_alias", alias, target)

    async def remove_alias(self, alias: str) -> None:
        await self._admin("remove_alias", alias)

    async def merge(self, spec: MergeSpec) -> dict:
        return await self._admin("merge", spec)

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


@serve.deployment(name="MedlegoIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class MedlegoIngress(RpcMethods, KServeMethods):
    """The REST app over HTTP (with /v2), and the gRPC methods (by RPC name) for Ray Serve's gRPC
    proxy: medlego.v1's and the Open Inference Protocol's (``inference.GRPCInferenceService``)."""

    def __init__(self, replicas, config: dict):
        self.frontend = RayFrontend(replicas, config_from_dict(config))
        self.rpc = MedlegoRPC(self.frontend)
        self.kserve = KServeServicer(self.frontend)

    def __del__(self):  # Ray Serve's shutdown of a replica: the buffered audit rows first
        frontend = getattr(self, "frontend", None)
        if frontend is not None:
            frontend.close()

    def __serve_build_asgi_app__(self):
        from .app import create_app

        # Ray's HTTP proxy answers with X-Request-ID itself (the client's, or one it made): the audit uses that one
        return create_app(self.frontend, title="medlego (Ray Serve)",
                          transport_request_id=lambda: serve.context._get_serve_request_context().request_id)


# -- building and running -------------------------------------------------------------------------------
@dataclass
class ReplicaShape:
    """How many engine replicas there are and where they may run (the replica deployment's options)."""

    replicas: int = 1  # fixed count; ignored when autoscaling is set
    autoscaling: dict | None = None  # Ray's autoscaling_config: min_replicas, max_replicas, target_ongoing_requests…
    cpus: float = 1.0  # per replica; Ray sets the replica's OMP_NUM_THREADS from it
    gpus: float = 0.0
    resources: dict | None = None  # custom resources per replica: replicas go only to nodes that offer them
    torch_threads: int | None = None  # engine threads per replica (None: what Ray's OMP_NUM_THREADS gives)

    def options(self) -> dict:
        """The keyword arguments of ``MedlegoReplica.options``."""
        actor = {"num_cpus": self.cpus, "num_gpus": self.gpus, **({"resources": dict(self.resources)}
                                                                  if self.resources else {})}
        count = {"autoscaling_config": dict(self.autoscaling)} if self.autoscaling else {"num_replicas": self.replicas}
        return {**count, "ray_actor_options": actor}


def build_app(cfg: ServeConfig, shape: ReplicaShape | None = None):
    """The Ray Serve application: ingress → engine replicas shaped by `shape`."""
    shape = shape or ReplicaShape()
    config = config_to_dict(cfg)
    return MedlegoIngress.bind(_replica_deployment(shape).bind(config, shape.torch_threads), config)


def _replica_deployment(shape: ReplicaShape):
    """MedlegoReplica with `shape`'s options; Ray's validation errors (pydantic's, many lines) as one line."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    # Ray ignores unknown autoscaling keys: a typo would silently keep the defaults
    unknown = sorted(set(shape.autoscaling or {}) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise BadInputError(f"unknown autoscaling setting(s) {unknown}; known: {sorted(AutoscalingConfig.model_fields)}")
    try:
        return MedlegoReplica.options(**shape.options())
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInputError(f"invalid replica settings: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


# app_builder args: the config fields they set, and the ReplicaShape fields (with their types)
_CONFIG_ARGS = {"model": ("base", "model", str), "weights": ("base", "weights", str),
                "data_dir": ("server", "data_dir", str), "device": ("engine", "device", str),
                "registry_url": ("registry", "url", str), "registry_store": ("registry", "store", str),
                "registry_cache_dir": ("registry", "cache_dir", str),
                "registry_cache_max_bytes": ("registry", "cache_max_bytes", int)}
_SHAPE_ARGS = {"replicas": ("replicas", int), "autoscaling": ("autoscaling", dict), "replica_cpus": ("cpus", float),
               "replica_gpus": ("gpus", float), "replica_resources": ("resources", dict),
               "torch_threads": ("torch_threads", int)}


def _shape_from_args(args: dict) -> ReplicaShape:
    shape = ReplicaShape()
    for key, (attr, kind) in _SHAPE_ARGS.items():
        if args.get(key) is not None:
            if not isinstance(args[key], kind) and not (kind is float and isinstance(args[key], int)):
                raise BadInputError(f"app arg '{key}' must be of type {kind.__name__}, got {args[key]!r}")
            setattr(shape, attr, kind(args[key]))
    if args.get("replicas") is not None and shape.autoscaling:
        raise BadInputError("give either 'replicas' (a fixed count) or 'autoscaling', not both")
    return shape


def app_builder(args: dict):
    """Entry for ``serve deploy`` / ``serve run`` (``import_path: medlego.serving.ray_app:app_builder``).

    args (all optional; ``serving/ray_config.yaml`` shows them):

    * ``config``: a medlego TOML file ([engine] [batching] [limits] [auth] [registry] …); the args
      below override it: ``model``, ``weights``, ``data_dir``, ``device``;
    * the shared registry: ``registry_url`` (postgresql://…), ``registry_store`` (s3://BUCKET/PREFIX),
      ``registry_cache_dir`` (node-local; ``{node}`` becomes the Ray node id), ``registry_cache_max_bytes``;
    * the replicas: ``replicas`` (a fixed count) or ``autoscaling`` (Ray's autoscaling_config:
      ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, …), ``replica_cpus``,
      ``replica_gpus``, ``replica_resources`` (custom resources each replica needs: placement),
      ``torch_threads``.

    Tokens come from the cluster's environment (MEDLEGO_ADMIN_TOKEN, MEDLEGO_API_TOKEN) or the
    config file's token files. An unknown arg is refused (a typo must not deploy defaults).
    """
    from medlego.runtime.config import load_config

    args = dict(args or {})
    unknown = sorted(set(args) - set(_CONFIG_ARGS) - set(_SHAPE_ARGS) - {"config"})
    if unknown:
        raise BadInputError(f"unknown app arg(s) {unknown}; known: {sorted([*_CONFIG_ARGS, *_SHAPE_ARGS, 'config'])}")
    cfg = load_config(args.get("config"))
    for key, (section, attr, kind) in _CONFIG_ARGS.items():
        if args.get(key) is not None:
            setattr(getattr(cfg, section), attr, kind(args[key]))
    return build_app(cfg, _shape_from_args(args))


def deploy(app, server: ServerConfig, *, grpc: bool = True):
    """Start Serve's HTTP (and gRPC) proxy on the connected Ray cluster and deploy `app`; returns its handle."""
    grpc_options = None
    if grpc:
        grpc_options = {"port": server.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER, GRPC_SERVICER_V2]}
    serve.start(proxy_location="HeadOnly", http_options={"host": server.host, "port": server.port},
                grpc_options=grpc_options)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


# Ray Serve's defaults suit nodes with many cores; on one small machine each costs the engine CPU
# (measured on 2 cores: Ray's processes took ~50 ms of CPU per request with the defaults, ~27 with these).
LOCAL_SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # our methods never block the loop: one thread hop less
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # the same for the handles' router
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",  # 10 passes a second by default: ~6% of a core, busy or idle
}
LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": 1 << 20}  # an image goes inline with its call, not via plasma


def start_local(cfg: ServeConfig, shape: ReplicaShape | None = None, *, num_cpus: int | None = None,
                grpc: bool = True, include_dashboard: bool = False):
    """Start a local Ray cluster (unless connected to one), Serve's proxies, and deploy; returns the app handle.

    A cluster started here gets :data:`LOCAL_SERVE_ENV` (where not set already) and
    :data:`LOCAL_SYSTEM_CONFIG`; an existing cluster keeps its own settings."""
    import os

    import ray

    if not ray.is_initialized():
        for key, value in LOCAL_SERVE_ENV.items():
            os.environ.setdefault(key, value)  # read by Ray's processes, which inherit this environment
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING, _system_config=LOCAL_SYSTEM_CONFIG)
    return deploy(build_app(cfg, shape), cfg.server, grpc=grpc)


def stop_local() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
