"""`medlego demo`: build a demo registry, start the embedded server, send real diagnosis requests, show them."""

from __future__ import annotations

import json
import os
import secrets
import sys

from medlego.jobs.demo import SAMPLE_SEED, is_right


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
    p.add_argument("--keep-serving", action="store_true",
                   help="keep the server running after the demo requests (until Ctrl-C or SIGTERM, exit 0)")
    p.set_defaults(func=_run)


def _client_command(url: str, request) -> str:
    return (f"medlego client diagnose --http {url} --adapter {request.adapter} --task {request.task} "
            f"{os.path.relpath(request.path)}")


def _curl_command(url: str, request) -> str:
    return (f"curl -s -X POST {url}/v1/diagnose -F file=@{os.path.relpath(request.path)} "
            f"-F adapter={request.adapter} -F task={request.task}")


def _verdict(answer: dict, truth, right: bool) -> str:
    """The answer in words beside the truth, marked right or wrong: the top label, or (multi-label) every
    label above 0.5."""
    mark = "[right]" if right else "[wrong]"
    if answer.get("multilabel"):
        found = sorted(label for label, p in answer["probabilities"].items() if p > 0.5)
        said, true = ", ".join(found) or "none", ", ".join(sorted(truth)) or "none"
        return f"labels above 0.5: {said}; true labels: {true} {mark}"
    return f"top label: {answer['top'][0]['label']}; true label: {truth} {mark}"


def eval_command(demo, score) -> str:
    """The `medlego eval` command that prints the same numbers as the demo's score line."""
    return (f"medlego eval --model {demo.model} --weights {os.path.relpath(demo.weights)} --data-dir "
            f"{os.path.relpath(demo.data_dir)} --adapter {score.adapter} --task {score.task} "
            f"--data {os.path.relpath(score.data)}")


def show_scores(demo) -> None:
    """Each adapter's held-out metrics, before any answer is shown: how good it is, not how good it looks."""
    print("\nheld-out test images (never trained on), per adapter and task; `medlego eval` prints the same numbers:")
    for s in demo.scores:
        how = (f"label-wise accuracy {s.accuracy:.4f} (each of an image's labels judged at 0.5), AUC {s.auc:.4f}; "
               f"{s.right} of {s.n} images with every label right" if s.multilabel else
               f"accuracy {s.accuracy:.4f} ({s.right} of {s.n} right), AUC {s.auc:.4f}")
        print(f"  {s.adapter} on '{s.task}': {how}\n    $ {eval_command(demo, s)}")
    print(flush=True)


def ask(client, url: str, demo) -> tuple[int, int]:
    """Send the demo's seeded sample (not chosen by its answers), print each answer marked right or wrong;
    (right, sent)."""
    right = shown = 0
    shown_json = set()
    print(f"a fixed sample of test images (seed {SAMPLE_SEED}, chosen without looking at any answer), "
          "each answer marked right or wrong:\n")
    for request in demo.requests:
        print(f"request:\n  {_client_command(url, request)}\n  (with curl: {_curl_command(url, request)})")
        with open(request.path, "rb") as fh:
            r = client.post("/v1/diagnose", files={"file": (os.path.basename(request.path), fh.read())},
                            data={"adapter": request.adapter, "task": request.task})
        if r.status_code != 200:
            print(f"unexpected answer {r.status_code}: {r.text}", file=sys.stderr)
            raise SystemExit(1)
        body = r.json()
        ok = is_right(body, request.truth)
        right += ok
        shown += 1
        print(f"answer (HTTP {r.status_code}): {_verdict(body, request.truth, ok)}")
        if (request.adapter, request.task) not in shown_json:  # the whole answer once per adapter and task
            shown_json.add((request.adapter, request.task))
            print("  " + json.dumps(body, indent=2).replace("\n", "\n  "))
        print(flush=True)
    print(f"sample: {right} of {shown} answers right (the held-out numbers above are the measure; a sample this "
          "small is an illustration)", flush=True)
    return right, shown


def _run(args) -> int:
    import httpx
    import torch

    from medlego.jobs.demo import build_demo
    from medlego.runtime.config import ADMIN_TOKEN_ENV, ServeConfig
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
    show_scores(demo)
    admin_token = os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(18)
    # the server `medlego serve` would start on this registry: same service, same audit trail
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = demo.model, str(demo.weights)
    cfg.server.data_dir, cfg.server.host = str(demo.data_dir), args.host
    cfg.auth.admin_token = admin_token
    service = DiagnosisService.from_config(cfg)
    server = EmbeddedServer(service, host=args.host, port=port, grpc_port=grpc_port, guard=cfg.server).start()
    try:
        url = server.url
        print(f"server ready: REST {url} (OpenAPI page {url}/docs), gRPC {server.grpc_target}; every diagnosis is "
              f"recorded in its audit trail (`medlego audit export --data-dir {os.path.relpath(demo.data_dir)}`)\n",
              flush=True)
        with httpx.Client(base_url=url, timeout=120) as client:
            ask(client, url, demo)
            listing = client.get("/v1/adapters").json()
        print("registered adapters: " + ", ".join(
            f"{a['ref']} ({'+'.join(t['name'] for t in a['tasks'])})" for a in listing["adapters"]))
        if not args.keep_serving:
            print("\ndone. `medlego demo --keep-serving` keeps the server up; `medlego serve --model "
                  f"{demo.model} --weights {os.path.relpath(demo.weights)} --data-dir {os.path.relpath(demo.data_dir)}` "
                  "serves the same registry.")
            return 0
        _serve_until_stopped(server, admin_token)
        print("stopping: draining requests in flight, writing the audit trail", flush=True)
        return 0
    finally:
        server.stop()


def _serve_until_stopped(server, admin_token: str) -> None:
    """Keep serving until Ctrl-C or SIGTERM (or the server's thread ends), printing how to reach it."""
    import signal
    import threading

    from medlego.jobs.demo import MERGED_NAME

    url = server.url
    stop = threading.Event()
    # Ctrl-C and SIGTERM alike: a clean stop with exit 0 (handlers set before the message that invites them)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"\nserving until Ctrl-C or SIGTERM. Admin token for this session: {admin_token}\n"
              f"  medlego client list --http {url}\n"
              f"  MEDLEGO_ADMIN_TOKEN={admin_token} medlego client register --http {url} my-adapter ADAPTER.safetensors\n"
              f"  medlego client describe --grpc {server.grpc_target} {MERGED_NAME}",
              flush=True)
        while not stop.is_set() and server._thread.is_alive():
            stop.wait(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
