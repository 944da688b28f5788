"""`medlego registry add|list|show|delete|pin|unpin|alias|gc`: the adapter registry for ops teams."""

from __future__ import annotations

import json

from .common import add_base_args, add_registry_args, registry_from_args


def register(sub) -> None:
    p = sub.add_parser("registry", help="register, list, describe, pin and delete adapters")
    add_registry_args(p)
    s = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    add = s.add_parser("add", help="validate an adapter file against the base and register it as a new version")
    add.add_argument("name", help="adapter name: letters, digits, '_', '-', '.'")
    add.add_argument("file", metavar="ADAPTER_FILE", help=".safetensors adapter file")
    add.add_argument("--alias", action="append", default=[], help="also point this alias at the new version")
    add.add_argument("--move-aliases", action="store_true", help="move an --alias that already points elsewhere")
    add.add_argument("--max-rank", type=int, default=None, help="refuse adapters above this rank (default: no limit here; a server refuses or truncates what is above its own [engine] max_rank)")
    add_base_args(add, required=False)
    add.set_defaults(func=_add)

    ls = s.add_parser("list", help="every registered version")
    ls.add_argument("--json", action="store_true", help="versions and aliases as one JSON object")
    ls.set_defaults(func=_list)

    show = s.add_parser("show", help="metadata, provenance, size, ranks and tasks of NAME[@VERSION] or an alias")
    show.add_argument("ref", help="NAME, NAME@VERSION or alias")
    show.set_defaults(func=_show)

    rm = s.add_parser("delete", help="delete NAME@VERSION (or every version of NAME); refused while pinned")
    rm.add_argument("ref", help="NAME@VERSION, or NAME for every version")
    rm.set_defaults(func=_delete)

    for action in ("pin", "unpin"):
        q = s.add_parser(action, help=f"{action} NAME[@VERSION] (pinned adapters stay on the device, cannot be deleted)")
        q.add_argument("ref", help="NAME, NAME@VERSION or alias")
        q.set_defaults(func=_pin, action=action)

    al = s.add_parser("alias", help="point ALIAS at NAME[@VERSION] (bare NAME follows the latest version)")
    al.add_argument("alias", help="the alias to set or remove")
    al.add_argument("ref", nargs="?", help="target; omit with --remove")
    al.add_argument("--remove", action="store_true", help="remove the alias instead")
    al.set_defaults(func=_alias)

    gc = s.add_parser("gc", help="remove stored files that no version references (left by killed registrations)")
    gc.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="remove temp files of uploads only when older than this (default: one hour)")
    gc.set_defaults(func=_gc)


def _add(args) -> int:
    from pathlib import Path

    from medlego.runtime.errors import BadInputError

    if not args.model:
        print("note: no --model/--weights given: validated the format only, not the fit to a base")
    path = Path(args.file)
    if not path.is_file():
        raise BadInputError(f"adapter file not found: {path}")
    base = None
    if args.model:
        from .common import load_base_from_args

        base = load_base_from_args(args)
    reg = registry_from_args(args, base=base, max_rank=args.max_rank, create=True)
    e = reg.register(args.name, path.read_bytes(), args.alias, move_aliases=args.move_aliases)
    print(f"registered {e.ref} sha256={e.sha256} ({e.size} bytes, tasks: {', '.join(t['name'] for t in e.tasks)})")
    return 0


def _list(args) -> int:
    reg = registry_from_args(args)
    entries = reg.list()
    if args.json:
        print(json.dumps({"adapters": [e.to_json() for e in entries], "aliases": reg.aliases()}))
        return 0
    print(f"{'REF':<28} {'TASKS':<28} {'RANK':>4} {'SIZE':>10}  PINNED  SHA256")
    for e in entries:
        tasks = ",".join(t["name"] for t in e.tasks)
        print(f"{e.ref:<28} {tasks:<28} {e.meta.get('max_rank', 0):>4} {e.size:>10}  {'yes' if e.pinned else 'no':<6}  {e.sha256[:16]}")
    for alias, target in reg.aliases().items():
        print(f"alias {alias} -> {target}")
    return 0


def _show(args) -> int:
    print(json.dumps(registry_from_args(args).describe(args.ref), indent=2))
    return 0


def _delete(args) -> int:
    from medlego.runtime.registry import parse_ref

    name, version = parse_ref(args.ref)
    gone = registry_from_args(args).delete(name, version)
    print("deleted " + ", ".join(e.ref for e in gone))
    return 0


def _pin(args) -> int:
    reg = registry_from_args(args)
    e = reg.pin(args.ref) if args.action == "pin" else reg.unpin(args.ref)
    print(f"{args.action}ned {e.ref}")
    return 0


def _alias(args) -> int:
    from medlego.runtime.errors import BadInputError

    reg = registry_from_args(args)
    if args.remove:
        reg.remove_alias(args.alias)
        print(f"removed alias {args.alias}")
        return 0
    if not args.ref:
        raise BadInputError("give the alias target NAME[@VERSION], or --remove")
    e = reg.set_alias(args.alias, args.ref)
    print(f"alias {args.alias} -> {args.ref} (now {e.ref})")
    return 0


def _gc(args) -> int:
    reg = registry_from_args(args)
    out = reg.gc() if args.grace is None else reg.gc(grace_s=args.grace)
    for sha in out["objects_removed"]:
        print(f"removed unreferenced object {sha}")
    print(f"gc: removed {len(out['objects_removed'])} unreferenced objects and {out['temp_files_removed']} stale temp files")
    return 0
