"""Ray Serve: the same engine, REST routes and gRPC service, scaled over replicas with adapter affinity.

The application is two deployments: the ingress (``ray_frontend.py``: the REST app and the gRPC
methods over :class:`~.ray_frontend.RayFrontend`, no engine) and the engine replicas
(``ray_replica.py``: one engine and batcher each, adapters loaded by ``@serve.multiplexed``);
``ray_metrics.py`` mirrors engine counters into Ray's metrics; ``ray_resilience.py`` holds the replicas'
health probe and the ingress's one retry when a replica dies. This module builds and runs it:
the replicas' shape, ``app_builder`` for ``serve deploy``/``serve run``, and local start/stop.

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

import logging
from dataclasses import dataclass

from ray import serve

from medlego.runtime.config import ServeConfig, ServerConfig, config_to_dict
from medlego.runtime.errors import BadInputError

from .ray_frontend import MedlegoIngress
from .ray_replica import MedlegoReplica

APP_NAME = "medlego"
GRPC_SERVICER = "medlego.serving.medlego_pb2_grpc.add_MedlegoServicer_to_server"
GRPC_SERVICER_V2 = "medlego.serving.kserve_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


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
    # how often Ray runs each replica's check_health (an engine probe, ray_resilience.py); None: Ray's 10 s
    health_period_s: float | None = None
    # requests a replica takes at once (None: MedlegoReplica's 512). Ray sends a request to a replica
    # holding its adapter until that one is full; only then to another (which loads it): a replica added
    # by autoscaling gets the held adapters' traffic only once the holders are full (docs/fleet.md)
    max_ongoing: int | None = None

    def options(self) -> dict:
        """The keyword arguments of ``MedlegoReplica.options``."""
        actor = {"num_cpus": self.cpus, "num_gpus": self.gpus, **({"resources": dict(self.resources)}
                                                                  if self.resources else {})}
        count = {"autoscaling_config": dict(self.autoscaling)} if self.autoscaling else {"num_replicas": self.replicas}
        health = {} if self.health_period_s is None else {"health_check_period_s": self.health_period_s}
        ongoing = {} if self.max_ongoing is None else {"max_ongoing_requests": self.max_ongoing}
        return {**count, **health, **ongoing, "ray_actor_options": actor}


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
                "registry_cache_max_bytes": ("registry", "cache_max_bytes", int),
                "registry_warm_on_start": ("registry", "warm_on_start", lambda v: _flag("registry_warm_on_start", v))}
_SHAPE_ARGS = {"replicas": ("replicas", int), "autoscaling": ("autoscaling", dict), "replica_cpus": ("cpus", float),
               "replica_gpus": ("gpus", float), "replica_resources": ("resources", dict),
               "torch_threads": ("torch_threads", int), "health_check_period_s": ("health_period_s", float),
               "max_ongoing_requests": ("max_ongoing", int)}


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


def _flag(name: str, value) -> bool:
    """A YAML boolean (bool("false") would be True)."""
    if isinstance(value, bool):
        return value
    raise BadInputError(f"app arg {name} must be true or false, got {value!r}")


def app_builder(args: dict):
    """Entry for ``serve deploy`` / ``serve run`` (``import_path: medlego.serving.ray_app:app_builder``).

    args (all optional; ``serving/ray_config.yaml`` shows them):

    * ``config``: a medlego TOML file ([engine] [batching] [limits] [auth] [registry] …); the args
      below override it: ``model``, ``weights``, ``data_dir``, ``device``;
    * the shared registry: ``registry_url`` (postgresql://…), ``registry_store`` (s3://BUCKET/PREFIX),
      ``registry_cache_dir`` (node-local; ``{node}`` becomes the Ray node id), ``registry_cache_max_bytes``,
      ``registry_warm_on_start`` (each replica fetches the base's adapters into its node cache as it starts);
    * the replicas: ``replicas`` (a fixed count) or ``autoscaling`` (Ray's autoscaling_config:
      ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, …), ``replica_cpus``,
      ``replica_gpus``, ``replica_resources`` (custom resources each replica needs: placement),
      ``torch_threads``, ``health_check_period_s`` (how often each replica proves its engine runs a batch),
      ``max_ongoing_requests`` (per replica; what makes a busy adapter spill to another replica).

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


def deploy(app, server: ServerConfig, *, grpc: bool = True, direct_ingress: bool = False):
    """Start Serve's HTTP (and gRPC) proxy on the connected Ray cluster and deploy `app`; returns its handle.

    `direct_ingress`: the cluster runs with :func:`direct_ingress_env`, so the ingress replica itself
    listens on the server's ports; Ray still starts its proxies, which get unused ports of their own."""
    http_port, grpc_port = server.port, server.grpc_port
    if direct_ingress:
        http_port, grpc_port = _unused_port(server.host), _unused_port(server.host)
    grpc_options = None
    if grpc:
        grpc_options = {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER, GRPC_SERVICER_V2]}
    serve.start(proxy_location="HeadOnly", http_options={"host": server.host, "port": http_port},
                grpc_options=grpc_options)
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    if direct_ingress:
        _wait_listening(server.host, server.port)
    return handle


def direct_ingress_env(server: ServerConfig) -> dict[str, str]:
    """The environment of a Ray cluster whose ingress replica serves the server's ports itself (Ray
    Serve's direct ingress, a feature flag of Ray 2.60): one hop less per request, HTTP proxy → ingress
    (Ray's fixed cost at light load 11.7 ms through the proxy, 3.2 ms direct, with the ingress → replica
    call by value, in one session: ``benchmarks/results/ray_overhead.md``).
    Ray gives each ingress replica a port of a range; the range here is exactly the configured port
    (``[port, port + 1)``), so an ingress that is redeployed waits for its predecessor to let it go:
    clients see refused connections for that moment (the default, proxied path redeploys without)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(server.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(server.port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(server.grpc_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(server.grpc_port + 1),
            # how long a stopping ingress keeps its port for a load balancer to notice (Ray's default: 30 s)
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def _unused_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, timeout_s: float = 60.0) -> None:
    """Until the ingress accepts on `port` (its direct-ingress server starts as the replica starts)."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BadInputError(f"the Ray ingress did not listen on {host}:{port} (direct ingress) within "
                                    f"{timeout_s:.0f} s; is the port taken?") from None
            time.sleep(0.2)


# Ray Serve's defaults suit nodes with many cores; on one small machine each costs the engine CPU
# (measured on 2 cores: Ray's processes took ~50 ms of CPU per request with the defaults, ~27 with these).
LOCAL_SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # our methods never block the loop: one thread hop less
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # the same for the handles' router
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",  # 10 passes a second by default: ~6% of a core, busy or idle
}
# what still goes as an actor call (admin calls; a diagnosis too large to go by value, ray_frontend.py) carries
# arguments up to 1 MiB inline (Ray's default: 100 KB), not via the object store
LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": 1 << 20}
_ENV_SET_HERE: dict[str, str] = {}  # what start_local put in this process's environment for one cluster


def start_local(cfg: ServeConfig, shape: ReplicaShape | None = None, *, num_cpus: int | None = None,
                grpc: bool = True, include_dashboard: bool = False, address: str | None = None,
                direct_ingress: bool = False):
    """Start a local Ray cluster (unless connected to one), Serve's proxies, and deploy; returns the app handle.

    A cluster started here gets :data:`LOCAL_SERVE_ENV` (where not set already) and
    :data:`LOCAL_SYSTEM_CONFIG`; an existing cluster keeps its own settings. `address` (``HEAD:6379``,
    or ``auto``; default: ``RAY_ADDRESS`` if set) joins a running cluster (``ray start --head``) instead:
    its resources and settings are its own, so `num_cpus` must not be given then. `direct_ingress`:
    the cluster started here gets :func:`direct_ingress_env` too (a running cluster needs it at
    ``ray start``, so it is refused with `address`)."""
    import os

    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        if num_cpus is not None:
            raise BadInputError("a running Ray cluster has its own CPUs: leave out --num-cpus with --address")
        if direct_ingress:
            raise BadInputError("direct ingress is set when a Ray cluster starts: start yours with the environment "
                                "of medlego.serving.ray_app.direct_ingress_env (docs/fleet.md), or leave out --address")
        ray.init(address=address, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    if direct_ingress and ray.is_initialized() and not _ENV_SET_HERE:
        # a cluster this process started or joined before, without the direct-ingress environment
        raise BadInputError("direct ingress is set when a Ray cluster starts: this process is already connected "
                            "to one started without it (stop_local first)")
    if not ray.is_initialized():
        for key, value in LOCAL_SERVE_ENV.items():
            os.environ.setdefault(key, value)  # read by Ray's processes, which inherit this environment
        if direct_ingress:
            _ENV_SET_HERE.update(direct_ingress_env(cfg.server))
            os.environ.update(_ENV_SET_HERE)
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING, _system_config=LOCAL_SYSTEM_CONFIG)
    return deploy(build_app(cfg, shape), cfg.server, grpc=grpc, direct_ingress=direct_ingress)


def stop_local() -> None:
    import os

    import ray

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key in _ENV_SET_HERE:  # a next cluster started by this process starts without them
            os.environ.pop(key, None)
        _ENV_SET_HERE.clear()
