"""`medlego client`: talk to a running server over REST or gRPC, with nothing installed beyond medlego
(it stands in for curl and grpcurl in the README and the demo)."""

from __future__ import annotations

import json
import os

from .common import add_listing_args

DEFAULT_URL = "http://127.0.0.1:8000"
# runtime.config's names, spelled here so that the client starts without importing torch
# (tests/test_cli_help.py checks that they agree)
API_TOKEN_ENV, ADMIN_TOKEN_ENV = "MEDLEGO_API_TOKEN", "MEDLEGO_ADMIN_TOKEN"


def register(sub) -> None:
    p = sub.add_parser("client", help="diagnose, list, describe and register adapters on a running server (REST or gRPC)",
                       description=f"A client of `medlego serve`. REST at --http URL (default {DEFAULT_URL}), or gRPC "
                                   f"with --grpc HOST:PORT. Tokens come from ${API_TOKEN_ENV} and ${ADMIN_TOKEN_ENV} "
                                   f"unless given.")
    s = p.add_subparsers(dest="client_command", metavar="ACTION", required=True)

    def action(name: str, help: str, func, admin: bool = False):
        q = s.add_parser(name, help=help, description=help)
        where = q.add_mutually_exclusive_group()
        where.add_argument("--http", metavar="URL", help=f"the server's REST address (default {DEFAULT_URL})")
        where.add_argument("--grpc", metavar="HOST:PORT", help="the server's gRPC address instead, e.g. 127.0.0.1:50051")
        # read from the environment when used, never shown as a default in --help
        if admin:
            q.add_argument("--admin-token", help=f"admin token (default ${ADMIN_TOKEN_ENV})")
        else:
            q.add_argument("--token", help=f"API token, where the server has one (default ${API_TOKEN_ENV})")
        q.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")
        q.set_defaults(func=func)
        return q

    d = action("diagnose", "diagnose image files with a registered adapter, one request per image", _diagnose)
    d.add_argument("--adapter", required=True, help="registered NAME, NAME@VERSION or alias")
    d.add_argument("--task", help="which of the adapter's tasks (needed when it carries several)")
    d.add_argument("--top-k", type=int, help="labels in 'top' (default: the server's, 3)")
    d.add_argument("--json", action="store_true", help="the server's JSON answer, one line per image, with 'image' added")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")

    ls = action("list", "registered adapter versions and their aliases, a page at a time", _list)
    ls.add_argument("--json", action="store_true", help="the server's JSON answer (one line per page with --all)")
    add_listing_args(ls)

    action("describe", "metadata and provenance of NAME, NAME@VERSION or an alias, as JSON", _describe) \
        .add_argument("ref", help="NAME, NAME@VERSION or alias")

    h = action("health", "is the server ready (base loaded and warmed up)? exit 0 if so", _health)
    h.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="keep asking for this long while the server is starting or not reachable yet")

    r = action("register", "upload an adapter file as the next version of NAME (admin)", _register, admin=True)
    r.add_argument("name", help="adapter name")
    r.add_argument("file", metavar="ADAPTER_FILE", help=".safetensors adapter file")
    r.add_argument("--alias", action="append", default=[], help="also point this alias at the new version (repeatable)")
    r.add_argument("--move-aliases", action="store_true", help="move an --alias that already points elsewhere")

    for name, what in (("pin", "keep NAME[@VERSION] on the device and refuse its deletion (admin)"),
                       ("unpin", "undo pin (admin)")):
        action(name, what, _pin, admin=True).add_argument("ref", help="NAME, NAME@VERSION or alias")

    rm = action("delete", "delete NAME@VERSION, or every version of NAME with --all-versions (admin)", _delete, admin=True)
    rm.add_argument("ref", help="NAME@VERSION, or NAME with --all-versions")
    rm.add_argument("--all-versions", action="store_true", help="delete every version of NAME")


def _client(args):
    from .client_transport import GrpcClient, HttpClient

    tokens = (getattr(args, "token", None) or os.environ.get(API_TOKEN_ENV),
              getattr(args, "admin_token", None) or os.environ.get(ADMIN_TOKEN_ENV))
    if args.grpc:
        return GrpcClient(args.grpc, *tokens, args.timeout)
    return HttpClient(args.http or DEFAULT_URL, *tokens, args.timeout)


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


def _diagnose(args) -> int:
    from .checks import check_readable

    check_readable(args.images)
    client = _client(args)
    for path in args.images:
        with open(path, "rb") as fh:
            answer = client.diagnose(args.adapter, args.task, args.top_k, os.path.basename(path), fh.read())
        if args.json:
            print(json.dumps({"image": path, **answer}))
        else:
            top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in answer["top"])
            print(f"{path}: {top}  [{answer['adapter']}@{answer['version']}, task {answer['task']}]")
    return 0


def _list(args) -> int:
    client, cursor = _client(args), args.cursor
    while True:
        listing = client.list(args.limit, cursor, args.prefix, args.task, args.base)
        cursor = listing.get("next_cursor")
        if args.json:
            print(json.dumps(listing) if args.all else json.dumps(listing, indent=2))
        else:
            for a in listing["adapters"]:
                tasks = ", ".join(f"{t['name']} ({len(t['labels'])} labels)" for t in a["tasks"])
                print(f"{a['ref']:<24} {tasks}{'  pinned' if a['pinned'] else ''}")
            for alias, target in listing["aliases"].items():
                print(f"alias {alias} -> {target}")
        if not cursor or not args.all:
            break
    if cursor and not args.json:
        print(f"more: --cursor {cursor} (or --all)")
    return 0


def _describe(args) -> int:
    _print_json(_client(args).describe(args.ref))
    return 0


def _health(args) -> int:
    import time

    from medlego.runtime.errors import BadInputError, OverloadedError

    client, deadline = _client(args), time.monotonic() + args.wait
    while True:
        try:
            state = client.health()
            if state.get("ready"):
                print(f"ready ({state.get('adapters', '?')} adapters, {state.get('device', '?')})")
                return 0
            problem = "the server is up but not ready yet"
        except BadInputError as e:  # not reachable (yet): the server may still be starting
            problem = str(e)
        if time.monotonic() >= deadline:
            raise OverloadedError(problem + (f" after {args.wait:g} s" if args.wait else ""))
        time.sleep(0.5)


def _register(args) -> int:
    with open(args.file, "rb") as fh:
        data = fh.read()
    a = _client(args).register(args.name, data, args.alias, args.move_aliases)
    aliases = f", aliases {', '.join(a['aliases'])}" if a.get("aliases") else ""
    print(f"registered {a['ref']} sha256={a['sha256'][:16]} (tasks: {', '.join(t['name'] for t in a['tasks'])}{aliases})")
    return 0


def _pin(args) -> int:
    a = _client(args).pin(args.ref, args.client_command == "pin")
    print(f"{args.client_command}ned {a['ref']}")
    return 0


def _delete(args) -> int:
    print("deleted " + ", ".join(_client(args).delete(args.ref, args.all_versions)["deleted"]))
    return 0
