"""`medlego serve`: the REST + gRPC server (embedded, one process) or a local Ray Serve deployment."""

from __future__ import annotations

import logging
import os
import sys

from medlego.runtime.config import BatchingConfig, EngineConfig

from .common import add_base_args, add_registry_args


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve diagnoses over REST and gRPC (embedded, or Ray Serve with --ray)",
        description="Start the diagnosis server against a registry folder. The admin API needs "
                    "MEDLEGO_ADMIN_TOKEN (closed without it); MEDLEGO_API_TOKEN makes diagnosis need a token too.")
    add_base_args(p, required=False)
    add_registry_args(p)
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default $MEDLEGO_CONFIG); flags override it")
    p.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    p.add_argument("--no-grpc", action="store_true", help="serve REST only")
    p.add_argument("--device", help=f"cpu, cuda, cuda:1 … ([engine] device; default {EngineConfig.device})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--kernel", choices=["auto", "fused", "split", "torch", "triton"],
                   help="qkv + LoRA path: auto (measured per batch size on CUDA, kept in DATA_DIR/kernel_choice.json; "
                        "the PyTorch reference on CPU), fused (one Triton launch), split (cuBLAS + Triton shrink/expand), "
                        f"torch (the reference); triton = fused ([engine] kernel; default {EngineConfig.kernel})")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay the adapted trunk from CUDA graphs per power-of-two batch bucket (CUDA, Triton kernel)")
    p.add_argument("--slots", type=int,
                   help=f"adapters resident on the device at once ([engine] slots; default {EngineConfig.slots})")
    p.add_argument("--max-rank", type=int, help="the largest adapter rank served ([engine] max_rank; default 16)")
    p.add_argument("--over-rank", choices=["refuse", "truncate"],
                   help="an adapter above --max-rank: refuse it (default), or serve its top --max-rank singular "
                        "directions, reporting the dropped share of singular-value mass ([engine] over_rank)")
    p.add_argument("--max-batch", type=int,
                   help=f"images per engine batch ([batching] max_batch; default {BatchingConfig.max_batch})")
    p.add_argument("--max-wait-ms", type=float,
                   help=f"how long a batch waits to fill ([batching] max_wait_ms; default {BatchingConfig.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int,
                   help=f"queued requests before 503 ([batching] max_queue; default {BatchingConfig.max_queue})")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="server log level (default info)")
    _add_dicom_args(p)
    _add_ray_args(p)
    p.set_defaults(func=_run)


def _add_dicom_args(p) -> None:
    d = p.add_argument_group("DICOM doors (docs/dicom.md; pip install \"medlego[dicom]\")")
    d.add_argument("--dicom-rules", metavar="FILE",
                   help="routing rules, destinations and DIMSE settings (TOML): opens POST /dicom-web/studies "
                        "(STOW-RS) and GET /v1/dicom/rules (default: no DICOM door)")
    d.add_argument("--dicom-port", type=int,
                   help="C-STORE SCP port (default: [dimse] port of the rules file; neither: no DIMSE door)")
    d.add_argument("--dicom-ae-title", metavar="AE",
                   help="this server's AE title (default: [dimse] ae_title of the rules file, else MEDLEGO)")


def _add_ray_args(p) -> None:
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="start a local Ray cluster and deploy with Ray Serve")
    r.add_argument("--direct-ingress", action="store_true",
                   help="the Ray ingress listens on --port/--grpc-port itself, without Ray's proxy hop (--ray, a "
                        "cluster this command starts; about half of Ray's fixed cost per request; a redeploy of "
                        "the ingress refuses connections for a moment)")
    r.add_argument("--replicas", type=int, default=None, help="engine replicas, a fixed count (--ray; default 1)")
    r.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas (--ray; default 1)")
    r.add_argument("--max-replicas", type=int, help="autoscaling's upper bound (--ray; default: --min-replicas)")
    r.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling's target of requests in flight per replica (--ray; default: --max-batch)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (--ray)")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (--ray)")
    r.add_argument("--torch-threads", type=int, help="engine threads per replica (--ray; default: --replica-cpus)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster (--ray; default: all of this machine's)")
    r.add_argument("--address", metavar="HEAD:PORT",
                   help="deploy on a running Ray cluster (`ray start --head`; 'auto': the one on this node) instead "
                        "of starting one (--ray; default: RAY_ADDRESS if set); Ctrl-C removes the app, not the cluster")


def config_from_args(args):
    from medlego.runtime.config import default_data_dir, load_config

    cfg = load_config(args.config)
    if args.model:
        cfg.base.model, cfg.base.weights, cfg.base.pretrained = args.model, args.weights, args.pretrained
    if args.data_dir:
        cfg.server.data_dir = str(default_data_dir(args.data_dir))
    for flag, attr in (("registry", "url"), ("store", "store"), ("cache_dir", "cache_dir")):
        if getattr(args, flag) is not None:
            setattr(cfg.registry, attr, getattr(args, flag))
    for flag in ("host", "port", "grpc_port", "log_level"):
        if getattr(args, flag) is not None:
            setattr(cfg.server, flag, getattr(args, flag))
    if args.no_grpc:
        cfg.server.grpc = False
    for flag in ("device", "dtype", "kernel", "cuda_graphs", "slots", "max_rank", "over_rank"):
        if getattr(args, flag) is not None:
            setattr(cfg.engine, flag, getattr(args, flag))
    for flag in ("max_batch", "max_wait_ms", "max_queue"):
        if getattr(args, flag) is not None:
            setattr(cfg.batching, flag, getattr(args, flag))
    return cfg


def _run(args) -> int:
    from medlego.runtime.config import ADMIN_TOKEN_ENV

    from .checks import check_device, check_port_free

    if args.direct_ingress and not args.ray:
        from medlego.runtime.errors import BadInputError

        raise BadInputError("--direct-ingress is a setting of the Ray deployment: add --ray")
    cfg = config_from_args(args)
    srv = cfg.server
    check_device(cfg.engine.device)
    srv.apply_switch_interval()  # the event loop's turn back from busy threads (checked before the base loads)
    check_port_free(srv.host, srv.port, "--port")
    if srv.grpc:
        check_port_free(srv.host, srv.grpc_port, "--grpc-port")
    if args.dicom_port is not None:
        check_port_free(srv.host, args.dicom_port, "--dicom-port")
    logging.basicConfig(level=srv.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.auth.admin_token:
        print(f"note: no admin token configured: the admin API is closed (set {ADMIN_TOKEN_ENV} to open it)",
              file=sys.stderr)
    if args.ray and (args.dicom_rules or args.dicom_port is not None):
        from medlego.runtime.errors import BadInputError

        raise BadInputError("the DICOM doors run with the embedded server only: leave out --ray or --dicom-rules")
    if args.ray:  # (the embedded server warns itself when its API is open beyond loopback)
        from medlego.serving.server import open_on_network

        warning = open_on_network(srv.host, cfg.auth)
        if warning:
            logging.getLogger("medlego.serving").warning(warning)
        return _run_ray(cfg, args)
    from medlego.serving.server import EmbeddedServer
    from medlego.serving.service import DiagnosisService

    service = DiagnosisService.from_config(cfg)
    server = EmbeddedServer(service, host=srv.host, port=srv.port, grpc_port=srv.grpc_port if srv.grpc else None,
                            log_level=srv.log_level, guard=srv)
    dimse = _dicom_doors(server, args)
    print(f"medlego serving {cfg.base.model} ({service.engine.device}) from {srv.data_dir}: "
          f"REST http://{srv.host}:{srv.port} (docs at /docs)"
          + (f", gRPC {srv.host}:{srv.grpc_port}" if srv.grpc else "")
          + (f", DICOM {dimse.ae_title}@{srv.host}:{dimse.port}" if dimse else "") + "; Ctrl-C stops", flush=True)
    try:
        server.run()
    finally:
        if dimse is not None:
            dimse.stop()
    return 0


def _dicom_doors(server, args):
    """The STOW-RS door and the C-STORE SCP (--dicom-rules); the rules' adapters checked first."""
    if not args.dicom_rules:
        if args.dicom_port is not None or args.dicom_ae_title:
            from medlego.runtime.errors import BadInputError

            raise BadInputError("--dicom-port and --dicom-ae-title need --dicom-rules FILE (routing and destinations)")
        return None
    from medlego.serving.dicom.attach import attach

    return attach(server, args.dicom_rules, ae_title=args.dicom_ae_title, port=args.dicom_port)


def _replica_shape(cfg, args):
    from medlego.runtime.errors import BadInputError
    from medlego.serving.ray_app import ReplicaShape

    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        if args.replicas is not None:
            raise BadInputError("give either --replicas or --min-replicas/--max-replicas, not both")
        low = args.min_replicas if args.min_replicas is not None else 1
        # a replica batches: about one full batch in flight per replica before another is started
        target = args.target_ongoing_requests or cfg.batching.max_batch
        autoscaling = {"min_replicas": low, "max_replicas": args.max_replicas or low, "target_ongoing_requests": target}
    # autoscaling: a replica full at two targets' worth spills its adapters' surplus to a replica just added,
    # which would otherwise idle while the first holds every adapter (docs/fleet.md, Ray Serve)
    spill = max(2, int(2 * autoscaling["target_ongoing_requests"])) if autoscaling else None
    return ReplicaShape(replicas=args.replicas or 1, autoscaling=autoscaling, cpus=args.replica_cpus,
                        gpus=args.replica_gpus, torch_threads=args.torch_threads, max_ongoing=spill)


def _run_ray(cfg, args) -> int:
    import time

    from medlego.runtime.errors import BadInputError
    from medlego.serving.ray_app import start_local, stop_local

    if not cfg.base.model:
        raise BadInputError("no base model: give --model NAME --weights FILE")
    shape = _replica_shape(cfg, args)
    # replicas may start in another working directory: every local path absolute
    if cfg.base.weights:
        cfg.base.weights = os.path.abspath(cfg.base.weights)
    cfg.server.data_dir = os.path.abspath(os.path.expanduser(cfg.server.data_dir))
    if cfg.registry.cache_dir:
        cfg.registry.cache_dir = os.path.abspath(os.path.expanduser(cfg.registry.cache_dir))
    srv = cfg.server
    count = (f"{shape.autoscaling['min_replicas']}-{shape.autoscaling['max_replicas']} (autoscaling)"
             if shape.autoscaling else str(shape.replicas))
    where = f"joining the Ray cluster at {args.address}" if args.address else "starting a local Ray cluster"
    print(f"{where} and deploying {count} replica(s)…", flush=True)
    try:
        start_local(cfg, shape, num_cpus=args.num_cpus, grpc=srv.grpc, address=args.address,
                    direct_ingress=args.direct_ingress)
        print(f"medlego on Ray Serve: REST http://{srv.host}:{srv.port}"
              + (f", gRPC {srv.host}:{srv.grpc_port}" if srv.grpc else "") + "; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_local()
    return 0
