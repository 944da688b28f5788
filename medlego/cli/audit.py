"""`medlego audit verify|export|prune`: the audit trail in the registry's database (runtime/audit.py)."""

from __future__ import annotations

import json
import sys

from .common import add_registry_args


def register(sub) -> None:
    p = sub.add_parser("audit", help="verify, export and prune the audit trail")
    add_registry_args(p)
    s = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    v = s.add_parser("verify", help="walk the hash chain; name the first altered, removed or reordered row (exit 1)")
    v.set_defaults(func=_verify)

    e = s.add_parser("export", help="rows as JSON lines, oldest first")
    e.add_argument("--since", help="from this ISO date/time (UTC unless it says otherwise)")
    e.add_argument("--until", help="before this ISO date/time")
    e.add_argument("--adapter", help="NAME or NAME@VERSION")
    e.add_argument("--caller", help="the caller's name")
    e.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    e.set_defaults(func=_export)

    pr = s.add_parser("prune", help="delete rows older than DATE; a hashed marker row keeps the chain verifiable")
    pr.add_argument("--before", required=True, metavar="DATE", help="ISO date/time: rows before it are removed")
    pr.set_defaults(func=_prune)


def _index(args):
    from pathlib import Path

    from medlego.runtime.config import default_data_dir
    from medlego.runtime.errors import BadInputError
    from medlego.runtime.registry.index import open_index

    data_dir = Path(default_data_dir(args.data_dir))
    if args.registry in (None, "", "sqlite") and not (data_dir / "registry.db").is_file():
        raise BadInputError(f"no registry database at {data_dir / 'registry.db'} (give --data-dir or --registry)")
    return open_index(args.registry, data_dir)


def _verify(args) -> int:
    from medlego.runtime.registry.audit import verify

    result = verify(_index(args))
    if result.ok:
        print(f"audit chain verified: {result.rows} rows")
        return 0
    print(f"audit chain BROKEN at row {result.seq}: {result.problem} ({result.rows} rows verified before it)",
          file=sys.stderr)
    return 1


def _export(args) -> int:
    from medlego.runtime.registry.audit import ensure_schema, query

    index = _index(args)
    ensure_schema(index)
    rows = query(index, since=args.since, until=args.until, adapter=args.adapter, caller=args.caller)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"{len(rows)} rows written to {args.output}")
    return 0


def _prune(args) -> int:
    from medlego.runtime.registry.audit import prune

    marker = prune(_index(args), args.before, caller="cli")
    if not marker.get("removed"):
        print("nothing to prune")
        return 0
    print(f"pruned {marker['removed']} rows before {marker['before']}; marker row {marker['seq']} "
          f"anchors the chain at row {marker['kept_from_seq']}")
    return 0
