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
  base); every replica reads the same registry directory, so a registration is live everywhere.

Answers carry ``replica`` and ``multiplex_hit`` (whether the adapter was already loaded on the
replica that answered). Engine counters are mirrored into Ray's metrics (``ray_medlego_*``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ray import serve

from medlego.runtime import errors as runtime_errors
from medlego.runtime.counters import Counters
from medlego.runtime.errors import BadInputError, MedlegoError

from . import auth as auth_module
from . import limits as limits_module
from .config import ServeConfig, build_service, config_from_dict, config_to_dict
from .metrics import CountersOnlyCollector
from .service import DiagnoseItem, outcome_of

log = logging.getLogger("medlego.serving")

APP_NAME = "medlego"
GRPC_SERVICER = "medlego.serving.medlego_pb2_grpc.add_MedlegoServicer_to_server"


# -- errors across the actor boundary: plain records, not pickled exceptions with tracebacks ------
def error_record(e: MedlegoError) -> dict:
    return {"error": {"type": type(e).__name__, "status": e.status, "message": str(e)}}


def raise_record(record: dict):
    err = record["error"]
    for module in (runtime_errors, auth_module, limits_module):
        cls = getattr(module, err["type"], None)
        if isinstance(cls, type) and issubclass(cls, MedlegoError):
            raise cls(err["message"])
    generic = type(err["type"], (MedlegoError,), {"status": err["status"]})
    raise generic(err["message"])


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


@serve.deployment(name="MedlegoReplica", max_ongoing_requests=512, ray_actor_options={"num_cpus": 1})
class MedlegoReplica:
    def __init__(self, config: dict, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = config_from_dict(config)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.service = build_service(cfg, replica=self.replica_id)
        self.service.warmup()
        self._held: set[str] = set()
        self.requests = 0
        self.hits = 0
        self.bridge = RayMetricsBridge(self.service.engine.counters, self._gauges)

    def _gauges(self) -> dict:
        stats = self.service.engine.pool.stats()
        return {"pool_device_resident": stats["device_resident"], "pool_host_resident": stats["host_resident"],
                "multiplex_held": len(self._held), "multiplex_hit_ratio": self.hits / self.requests if self.requests else 0.0}

    @serve.multiplexed(max_num_models_per_replica=64)
    async def adapter(self, model_id: str) -> _Held:
        """Load an adapter (name@version) into this replica's host tier; Ray keeps an LRU of these."""
        loop = asyncio.get_running_loop()
        resolved = await loop.run_in_executor(None, self.service.engine.resolve, model_id)
        self._held.add(model_id)
        return _Held(self._held, model_id, resolved)

    async def diagnose(self, item: dict, api: str = "rest") -> dict:
        model_id = serve.get_multiplexed_model_id()
        hit = bool(model_id) and model_id in self._held
        try:
            if model_id:
                await self.adapter(model_id)
            d = await self.service.diagnose(DiagnoseItem(**item), api=api)
        except MedlegoError as e:
            return error_record(e)
        self.requests += 1
        self.hits += hit
        self.service.engine.counters.inc("multiplex_requests", hit=str(hit).lower())
        out = self.service.diagnosis_json(d)
        out["multiplex_hit"] = hit
        return out

    async def admin(self, op: str, *args):
        allowed = {"register", "delete", "pin", "unpin", "set_alias", "remove_alias", "merge"}
        if op not in allowed:
            return error_record(BadInputError(f"unknown admin operation '{op}'"))
        try:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: getattr(self.service, op)(*args))
        except MedlegoError as e:
            return error_record(e)

    def health(self) -> dict:
        self.bridge.sync()  # also proves the Ray metrics path works
        return {**self.service.info(), "multiplex": {"requests": self.requests, "hits": self.hits,
                                                     "held": sorted(self._held)},
                "ray_metrics": {"syncs": self.bridge.syncs, "last_error": self.bridge.last_error}}

    def metrics_text(self) -> bytes:
        return self.service.metrics_text()

    def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError("engine not warmed up")


# -- the ingress --------------------------------------------------------------------------------------
class RayFrontend:
    """What create_app and MedlegoRPC call, backed by the replica deployment (see DiagnosisService)."""

    def __init__(self, replicas, cfg: ServeConfig):
        from medlego.runtime.registry import Registry

        self.replicas = replicas
        self.limits = cfg.limits
        self.auth = cfg.auth
        self.registry = Registry(cfg.data_dir)  # reads only; writes are validated by a replica
        self.counters = Counters()
        from prometheus_client import CollectorRegistry

        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(CountersOnlyCollector(self.counters))
        self.bridge = RayMetricsBridge(self.counters)

    def diagnosis_json(self, d: dict) -> dict:
        return d

    async def _resolve(self, ref: str) -> str:
        if not ref:
            raise BadInputError("'adapter' is required: a registered name, name@version or alias")
        return self.registry.resolve(ref).ref  # one indexed SQLite read on this thread's open connection (~0.03 ms)

    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> dict:
        t0 = time.perf_counter()
        try:
            model_id = await self._resolve(item.adapter)
            handle = self.replicas.options(multiplexed_model_id=model_id)
            fields = {"image": item.image, "adapter": model_id, "task": item.task, "top_k": item.top_k}
            out = unwrap(await handle.diagnose.remote(fields, api))
        except MedlegoError as e:
            self.counters.inc("requests", adapter="", task="", outcome=outcome_of(e), api=api)
            raise
        self.counters.inc("requests", adapter=out["adapter"], task=out["task"], outcome="ok", api=api)
        self.counters.observe("request_seconds", time.perf_counter() - t0, api=api)
        out.setdefault("timings_ms", {})["ingress_total"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    async def diagnose_many(self, items: list[DiagnoseItem], api: str = "rest") -> list[dict]:
        self.limits.check_batch(len(items))
        results = await asyncio.gather(*[self.diagnose(it, api) for it in items], return_exceptions=True)
        for n, r in enumerate(results):
            if isinstance(r, MedlegoError):
                raise type(r)(f"image {n}: {r}") from None
            if isinstance(r, BaseException):
                raise r
        return results

    # reads: straight from the shared registry
    def list_adapters(self) -> dict:
        return {"adapters": [e.to_json() for e in self.registry.list()], "aliases": self.registry.aliases()}

    def describe(self, ref: str) -> dict:
        return self.registry.describe(ref)

    def aliases(self) -> dict:
        return self.registry.aliases()

    # writes: on a replica
    async def _admin(self, op: str, *args):
        return unwrap(await self.replicas.admin.remote(op, *args))

    async def register(self, name, data, aliases=()):
        self.limits.check_adapter_bytes(data)
        return await self._admin("register", name, data, list(aliases))

    async def delete(self, ref, all_versions=False):
        return await self._admin("delete", ref, all_versions)

    async def pin(self, ref):
        return await self._admin("pin", ref)

    async def unpin(self, ref):
        return await self._admin("unpin", ref)

    async def set_alias(self, alias, target):
        return await self._admin("set_alias", alias, target)

    async def remove_alias(self, alias):
        return await self._admin("remove_alias", alias)

    async def merge(self, name, sources, method="med-lego", params=None, aliases=(), task_names=None):
        return await self._admin("merge", name, sources, method, params, list(aliases), task_names)

    async def health(self) -> dict:
        try:
            h = await self.replicas.health.remote()
        except Exception as e:  # no replica up yet
            return {"alive": True, "ready": False, "adapters": -1, "device": "", "error": str(e).splitlines()[0]}
        return {k: v for k, v in h.items() if k in ("alive", "ready", "adapters", "device", "model", "input_size",
                                                    "fingerprint")}

    async def info(self) -> dict:
        return await self.replicas.health.remote()

    def metrics_text(self) -> bytes:
        from .metrics import render

        note = (b"# Ray mode: these are the ingress's request counters; engine, pool and batch metrics of\n"
                b"# every replica are exported through Ray's metrics endpoint as ray_medlego_*.\n")
        return note + render(self.metrics)


@serve.deployment(name="MedlegoIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class MedlegoIngress:
    def __init__(self, replicas, config: dict):
        from .grpc_service import MedlegoRPC

        self.frontend = RayFrontend(replicas, config_from_dict(config))
        self.rpc = MedlegoRPC(self.frontend)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.frontend, title="medlego (Ray Serve)")

    async def _grpc(self, name: str, request, grpc_context):
        from .grpc_service import authorization_of, grpc_code

        try:
            metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
            return await getattr(self.rpc, name)(request, authorization_of(metadata))
        except MedlegoError as e:
            if grpc_context is not None:
                grpc_context.set_code(grpc_code(e))
                grpc_context.set_details(str(e))
            raise

    # Ray's gRPC proxy calls these by the RPC's name
    async def Diagnose(self, request, grpc_context=None):
        return await self._grpc("Diagnose", request, grpc_context)

    async def DiagnoseBatch(self, request, grpc_context=None):
        return await self._grpc("DiagnoseBatch", request, grpc_context)

    async def ListAdapters(self, request, grpc_context=None):
        return await self._grpc("ListAdapters", request, grpc_context)

    async def DescribeAdapter(self, request, grpc_context=None):
        return await self._grpc("DescribeAdapter", request, grpc_context)

    async def RegisterAdapter(self, request, grpc_context=None):
        return await self._grpc("RegisterAdapter", request, grpc_context)

    async def DeleteAdapter(self, request, grpc_context=None):
        return await self._grpc("DeleteAdapter", request, grpc_context)

    async def Health(self, request, grpc_context=None):
        return await self._grpc("Health", request, grpc_context)


# -- building and running -------------------------------------------------------------------------------
def build_app(cfg: ServeConfig, *, replicas: int = 1, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
              torch_threads: int | None = None):
    """The Ray Serve application: ingress → N engine replicas."""
    config = config_to_dict(cfg)
    replica = MedlegoReplica.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus})
    return MedlegoIngress.bind(replica.bind(config, torch_threads), config)


def app_builder(args: dict):
    """Entry for ``serve deploy`` / ``serve run`` (``import_path: medlego.serving.ray_app:app_builder``).

    args: model, weights, data_dir, config (a TOML file), replicas, replica_cpus, replica_gpus,
    torch_threads, device. Tokens come from the cluster's environment (MEDLEGO_ADMIN_TOKEN,
    MEDLEGO_API_TOKEN) or the config file's token files.
    """
    from .config import load_config

    args = dict(args or {})
    cfg = load_config(args.pop("config", None))
    for key in ("model", "weights", "data_dir"):
        if args.get(key):
            setattr(cfg, key, str(args.pop(key)))
    if args.get("device"):
        cfg.engine.device = str(args.pop("device"))
    return build_app(cfg, replicas=int(args.pop("replicas", 1)), replica_cpus=float(args.pop("replica_cpus", 1.0)),
                     replica_gpus=float(args.pop("replica_gpus", 0.0)),
                     torch_threads=int(args["torch_threads"]) if args.get("torch_threads") else None)


def start_local(cfg: ServeConfig, *, replicas: int = 1, num_cpus: int | None = None, replica_cpus: float = 1.0,
                replica_gpus: float = 0.0, torch_threads: int | None = None, grpc: bool = True,
                include_dashboard: bool = False, timeout_s: float = 300.0):
    """Start a local Ray cluster, Serve's HTTP (and gRPC) proxy, and deploy; returns the app handle."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING)
    grpc_options = None
    if grpc:
        grpc_options = {"port": cfg.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port}, grpc_options=grpc_options)
    app = build_app(cfg, replicas=replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                    torch_threads=torch_threads)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def stop_local() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
