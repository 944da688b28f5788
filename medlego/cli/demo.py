"""`medlego demo`: build a demo registry, start the embedded server, send real diagnosis requests, show them."""

from __future__ import annotations

import json
import os
import secrets
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="build a demo registry (tiny base, 3 trained adapters, 1 merged), serve it, send real requests",
        description="Builds everything locally in DIR (a few minutes on two CPU cores the first time; reused "
                    "afterwards), starts the REST + gRPC server on loopback, sends diagnosis requests over HTTP, "
                    "prints each request and answer beside the image's true label, and exits (or keeps serving "
                    "with --keep-serving).")
    p.add_argument("--dir", default="medlego-demo", metavar="DIR", help="demo folder")
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=None, help="REST port (default: any free one; 8000 with --keep-serving)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: any free one; 50051 with --keep-serving)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs per demo adapter")
    p.add_argument("--keep-serving", action="store_true", help="keep the server running after the demo requests")
    p.set_defaults(func=_run)


def _client_command(url: str, request) -> str:
    return (f"medlego client diagnose --http {url} --adapter {request.adapter} --task {request.task} "
            f"{os.path.relpath(request.path)}")


def _curl_command(url: str, request) -> str:
    return (f"curl -s -X POST {url}/v1/diagnose -F file=@{os.path.relpath(request.path)} "
            f"-F adapter={request.adapter} -F task={request.task}")


def _verdict(answer: dict, truth) -> str:
    """The answer in words beside the truth: the top label, or (multi-label) every label above 0.5."""
    if answer.get("multilabel"):
        found = sorted(label for label, p in answer["probabilities"].items() if p > 0.5)
        said, true = ", ".join(found) or "none", ", ".join(sorted(truth)) or "none"
        return f"labels above 0.5: {said}; true labels: {true}"
    return f"top label: {answer['top'][0]['label']}; true label: {truth}"


def _run(args) -> int:
    import httpx
    import torch

    from medlego.jobs.demo import MERGED_NAME, build_demo
    from medlego.runtime.base import load_base
    from medlego.runtime.config import ADMIN_TOKEN_ENV, EngineConfig
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry
    from medlego.serving.auth import Auth
    from medlego.serving.server import EmbeddedServer
    from medlego.serving.service import DiagnosisService

    from .checks import check_port_free

    port = args.port if args.port is not None else (8000 if args.keep_serving else 0)
    grpc_port = args.grpc_port if args.grpc_port is not None else (50051 if args.keep_serving else 0)
    check_port_free(args.host, port, "--port")  # before minutes of building, not after
    check_port_free(args.host, grpc_port, "--grpc-port")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"medlego demo: building the demo registry in {args.dir} (synthetic data; nothing is downloaded)", flush=True)
    demo = build_demo(args.dir, epochs=args.epochs, log=lambda m: print("  " + m, flush=True))
    admin_token = os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(18)
    base = load_base(demo.model, demo.weights)
    registry = Registry(demo.data_dir, base=base.spec, max_rank=16, input_size=base.input_size)
    service = DiagnosisService(Engine(base, registry, EngineConfig()), auth=Auth(admin_token=admin_token))
    server = EmbeddedServer(service, host=args.host, port=port, grpc_port=grpc_port).start()
    try:
        url = server.url
        print(f"\nserver ready: REST {url} (OpenAPI page {url}/docs), gRPC {server.grpc_target}\n", flush=True)
        with httpx.Client(base_url=url, timeout=120) as client:
            for request in demo.requests:
                print(f"request:\n  {_client_command(url, request)}\n  (with curl: {_curl_command(url, request)})")
                with open(request.path, "rb") as fh:
                    r = client.post("/v1/diagnose", files={"file": (os.path.basename(request.path), fh.read())},
                                    data={"adapter": request.adapter, "task": request.task})
                if r.status_code != 200:
                    print(f"unexpected answer {r.status_code}: {r.text}", file=sys.stderr)
                    return 1
                body = r.json()
                print(f"answer (HTTP {r.status_code}): {_verdict(body, request.truth)}")
                print("  " + json.dumps(body, indent=2).replace("\n", "\n  ") + "\n", flush=True)
            listing = client.get("/v1/adapters").json()
        print("registered adapters: " + ", ".join(
            f"{a['ref']} ({'+'.join(t['name'] for t in a['tasks'])})" for a in listing["adapters"]))
        if not args.keep_serving:
            print("\ndone. `medlego demo --keep-serving` keeps the server up; `medlego serve --model "
                  f"{demo.model} --weights {os.path.relpath(demo.weights)} --data-dir {os.path.relpath(demo.data_dir)}` "
                  "serves the same registry.")
            return 0
        print(f"\nserving until Ctrl-C. Admin token for this session: {admin_token}\n"
              f"  medlego client list --http {url}\n"
              f"  MEDLEGO_ADMIN_TOKEN={admin_token} medlego client register --http {url} my-adapter ADAPTER.safetensors\n"
              f"  medlego client describe --grpc {server.grpc_target} {MERGED_NAME}",
              flush=True)
        try:
            server._thread.join()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        server.stop()
