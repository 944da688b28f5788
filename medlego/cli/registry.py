"""`medlego registry add|list|show|delete|pin|unpin|alias|warm|gc`: the adapter registry for ops teams."""

from __future__ import annotations

import json

from .common import add_base_args, add_filter_args, add_listing_args, add_registry_args, registry_from_args


def register(sub) -> None:
    p = sub.add_parser("registry", help="register, list, describe, pin and delete adapters")
    add_registry_args(p)
    s = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    add = s.add_parser("add", help="validate an adapter file against the base and register it as a new version")
    add.add_argument("name", nargs="?", help="adapter name: letters, digits, '_', '-', '.'")
    add.add_argument("file", nargs="?", metavar="ADAPTER_FILE", help=".safetensors adapter file")
    add.add_argument("--many", metavar="DIR", help="instead: register every DIR/*.safetensors, each under its file "
                                                   "name without the suffix, one transaction per --batch files")
    add.add_argument("--batch", type=int, default=500, metavar="N", help="files per transaction with --many (default 500)")
    add.add_argument("--alias", action="append", default=[], help="also point this alias at the new version")
    add.add_argument("--move-aliases", action="store_true", help="move an --alias that already points elsewhere")
    add.add_argument("--max-rank", type=int, default=None, help="refuse adapters above this rank (default: no limit here; a server refuses or truncates what is above its own [engine] max_rank)")
    add_base_args(add, required=False)
    add.set_defaults(func=_add)

    ls = s.add_parser("list", help="registered versions and their aliases, a page at a time")
    ls.add_argument("--json", action="store_true", help="each page as one JSON object (one line per page with --all)")
    add_listing_args(ls)
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

    warm = s.add_parser("warm", help="fetch registered adapters from an S3 store into this node's cache before "
                                     "traffic needs them (a new or restarted node)")
    warm.add_argument("--workers", type=int, default=4, metavar="N", help="downloads at a time (default 4)")
    add_filter_args(warm)
    warm.set_defaults(func=_warm)

    gc = s.add_parser("gc", help="remove stored files that no version references (left by killed registrations)")
    gc.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="remove temp files of uploads only when older than this (default: one hour)")
    gc.set_defaults(func=_gc)


def _add(args) -> int:
    from pathlib import Path

    from medlego.runtime.errors import BadInputError

    if args.many is not None:
        if args.name or args.file or args.alias:
            raise BadInputError("give either NAME ADAPTER_FILE [--alias A] or --many DIR, not both")
        return _add_many(args)
    if not args.name or not args.file:
        raise BadInputError("give NAME and ADAPTER_FILE (or --many DIR)")
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


def _add_many(args) -> int:
    """Every *.safetensors of a folder, in name order, one transaction per batch: a batch that fails
    (a bad file, named in the one-line error) writes nothing; the batches before it stay registered."""
    import time
    from pathlib import Path

    from medlego.runtime.errors import BadInputError

    folder = Path(args.many)
    if not folder.is_dir():
        raise BadInputError(f"--many needs a folder of .safetensors files: {folder} is not a folder")
    if not 1 <= args.batch <= 10_000:
        raise BadInputError(f"bad --batch {args.batch}: 1 to 10000 files per transaction")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"no *.safetensors file in {folder}")
    base = None
    if args.model:
        from .common import load_base_from_args

        base = load_base_from_args(args)
    reg = registry_from_args(args, base=base, max_rank=args.max_rank, create=True)
    t0, done = time.perf_counter(), 0
    for start in range(0, len(files), args.batch):
        chunk = files[start:start + args.batch]
        done += len(reg.register_many([(p.name[:-len(".safetensors")], p.read_bytes()) for p in chunk]))
        print(f"registered {done}/{len(files)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


def _list(args) -> int:
    from medlego.runtime.registry.listing import check_filters

    reg, filters, cursor = registry_from_args(args), check_filters(args.prefix, args.task, args.base), args.cursor
    if not args.json:
        print(f"{'REF':<28} {'TASKS':<28} {'RANK':>4} {'SIZE':>10}  PINNED  SHA256")
    while True:
        page = reg.list_page(args.limit, cursor, filters)
        cursor = page.next_cursor
        if args.json:
            print(json.dumps({"adapters": [e.to_json() for e in page.entries], "aliases": page.aliases,
                              **({"next_cursor": cursor} if cursor else {})}))
        else:
            _print_page(page)
        if not cursor or not args.all:
            break
    if cursor and not args.json:
        print(f"more: --cursor {cursor} (or --all)")
    return 0


def _print_page(page) -> None:
    for e in page.entries:
        tasks = ",".join(t["name"] for t in e.tasks)
        print(f"{e.ref:<28} {tasks:<28} {e.meta.get('max_rank', 0):>4} {e.size:>10}  {'yes' if e.pinned else 'no':<6}  {e.sha256[:16]}")
    for alias, target in page.aliases.items():
        print(f"alias {alias} -> {target}")


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


def _warm(args) -> int:
    from medlego.runtime.registry.listing import check_filters

    reg = registry_from_args(args)
    r = reg.warm(check_filters(args.prefix, args.task, args.base), args.workers)
    if r.room_bytes is None:
        print(f"nothing to warm: the {r.versions} matching versions are read from this machine's folder store")
        return 0
    print(f"node cache {reg.cache_dir}: {r.fetched} fetched ({r.bytes_fetched / 1e6:.1f} MB), {r.cached} already "
          f"there, of {r.objects} files for {r.versions} matching versions, in {r.seconds:.1f} s")
    if r.missing:
        print(f"{r.missing} were deleted from the store meanwhile")
    if r.left_out:
        print(f"{r.left_out} left out, e.g. {', '.join(r.samples)}: the cache keeps {r.room_bytes / 1e6:.0f} MB without "
              "evicting what it warmed; raise --cache-max-bytes (the server's [registry] cache_max_bytes) or filter")
    return 0
