"""`medlego serve`: the REST + gRPC server (embedded, one process) or a local Ray Serve deployment."""

from __future__ import annotations

import logging
import os
import sys

from .common import add_base_args


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve diagnoses over REST and gRPC (embedded, or Ray Serve with --ray)",
        description="Start the diagnosis server against a registry folder. The admin API needs "
                    "MEDLEGO_ADMIN_TOKEN (closed without it); MEDLEGO_API_TOKEN makes diagnosis need a token too.")
    add_base_args(p, required=False)
    p.add_argument("--data-dir", metavar="DIR", help="registry folder (default $MEDLEGO_DATA_DIR or ~/.medlego)")
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default $MEDLEGO_CONFIG); flags override it")
    p.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    p.add_argument("--no-grpc", action="store_true", help="serve REST only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--kernel", choices=["auto", "torch", "triton"], help="LoRA kernel (auto: Triton on CUDA)")
    p.add_argument("--slots", type=int, help="adapters resident on the device at once")
    p.add_argument("--max-batch", type=int, help="images per engine batch")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, help="queued requests before 503")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="start a local Ray cluster and deploy with Ray Serve")
    r.add_argument("--replicas", type=int, default=1, help="engine replicas (--ray)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (--ray)")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (--ray)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster (--ray)")
    p.set_defaults(func=_run)


def config_from_args(args):
    from medlego.runtime.refs import default_data_dir
    from medlego.serving.config import load_config

    cfg = load_config(args.config)
    if args.model:
        cfg.model, cfg.weights, cfg.pretrained = args.model, args.weights, args.pretrained
    if args.data_dir or not cfg.data_dir or cfg.data_dir == "~/.medlego":
        cfg.data_dir = str(default_data_dir(args.data_dir))
    for flag, attr in (("host", "host"), ("port", "port"), ("grpc_port", "grpc_port"), ("log_level", "log_level")):
        if getattr(args, flag) is not None:
            setattr(cfg, attr, getattr(args, flag))
    if args.no_grpc:
        cfg.grpc = False
    for flag in ("device", "dtype", "kernel", "slots"):
        if getattr(args, flag) is not None:
            setattr(cfg.engine, flag, getattr(args, flag))
    for flag in ("max_batch", "max_wait_ms", "max_queue"):
        if getattr(args, flag) is not None:
            setattr(cfg.batching, flag, getattr(args, flag))
    return cfg


def _run(args) -> int:
    from medlego.serving.auth import ADMIN_TOKEN_ENV

    cfg = config_from_args(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.admin_token:
        print(f"note: no admin token configured: the admin API is closed (set {ADMIN_TOKEN_ENV} to open it)",
              file=sys.stderr)
    if args.ray:
        return _run_ray(cfg, args)
    from medlego.serving.config import build_service
    from medlego.serving.server import EmbeddedServer

    service = build_service(cfg)
    server = EmbeddedServer(service, host=cfg.host, port=cfg.port, grpc_port=cfg.grpc_port if cfg.grpc else None,
                            log_level=cfg.log_level)
    print(f"medlego serving {cfg.model} ({service.engine.device}) from {cfg.data_dir}: "
          f"REST http://{cfg.host}:{cfg.port} (docs at /docs)"
          + (f", gRPC {cfg.host}:{cfg.grpc_port}" if cfg.grpc else "") + "; Ctrl-C stops", flush=True)
    server.run()
    return 0


def _run_ray(cfg, args) -> int:
    import time

    from medlego.runtime.errors import BadInputError
    from medlego.serving.ray_app import start_local, stop_local

    if not cfg.model:
        raise BadInputError("no base model: give --model NAME --weights FILE")
    if cfg.weights:
        cfg.weights = os.path.abspath(cfg.weights)  # replicas may start elsewhere
    cfg.data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
    print(f"starting a local Ray cluster and deploying {args.replicas} replica(s)…", flush=True)
    try:
        start_local(cfg, replicas=args.replicas, num_cpus=args.num_cpus, replica_cpus=args.replica_cpus,
                    replica_gpus=args.replica_gpus, grpc=cfg.grpc)
        print(f"medlego on Ray Serve: REST http://{cfg.host}:{cfg.port}"
              + (f", gRPC {cfg.host}:{cfg.grpc_port}" if cfg.grpc else "") + "; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_local()
    return 0
