"""`medlego audit verify|export|prune|keygen`: the audit trail in the registry's database
(runtime/registry/audit.py). The registry flags go before or after the action."""

from __future__ import annotations

import json
import sys

from .common import add_registry_args


def register(sub) -> None:
    p = sub.add_parser("audit", help="verify, export and prune the audit trail; make its signing key")
    add_registry_args(p)
    s = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    v = s.add_parser("verify", help="walk the hash chain (streamed) and check every row's columns; with "
                                    "--public-key, every signed checkpoint and prune marker too; name the "
                                    "first row that does not fit (exit 1)")
    v.add_argument("--public-key", metavar="FILE",
                   help="the audit key's public half (medlego audit keygen): check the signed checkpoints in the "
                        "store (truncation, rewritten chain) and the prune markers' signatures")
    v.add_argument("--grace", type=float, default=120.0, metavar="SECONDS",
                   help="rows after the last checkpoint are accepted only when newer than this")
    v.set_defaults(func=_verify)

    e = s.add_parser("export", help="rows oldest first: JSON lines, or a FHIR R4 Bundle of AuditEvent resources")
    e.add_argument("--since", help="from this ISO date/time (UTC unless it says otherwise)")
    e.add_argument("--until", help="before this ISO date/time")
    e.add_argument("--adapter", help="NAME or NAME@VERSION")
    e.add_argument("--caller", help="the caller's name")
    e.add_argument("--format", choices=("jsonl", "fhir"), default="jsonl",
                   help="jsonl: one row per line; fhir: one FHIR R4 Bundle (type collection) of AuditEvent resources")
    e.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    e.set_defaults(func=_export)

    pr = s.add_parser("prune", help="delete rows older than DATE; a hashed (and signed) marker row keeps the chain "
                                    "verifiable")
    pr.add_argument("--before", required=True, metavar="DATE", help="ISO date/time: rows before it are removed")
    pr.add_argument("--signing-key", metavar="FILE",
                    help="the audit private key ([audit] signing_key): signs the marker and checkpoints it; "
                         "verify --public-key refuses unsigned markers")
    pr.set_defaults(func=_prune)

    k = s.add_parser("keygen", help="write an Ed25519 key pair for signed checkpoints: FILE (private, mode 0600, "
                                    "for [audit] signing_key) and FILE.pub (for verify --public-key)")
    k.add_argument("--output", "-o", required=True, metavar="FILE", help="the private key file to write")
    k.set_defaults(func=_keygen)


def _data_dir(args):
    from pathlib import Path

    from medlego.runtime.config import default_data_dir

    return Path(default_data_dir(args.data_dir))


def _index(args):
    from medlego.runtime.errors import BadInputError
    from medlego.runtime.registry.index import open_index

    data_dir = _data_dir(args)
    if args.registry in (None, "", "sqlite") and not (data_dir / "registry.db").is_file():
        raise BadInputError(f"no registry database at {data_dir / 'registry.db'} (give --data-dir or --registry)")
    return open_index(args.registry, data_dir)


def _store(args):
    from pathlib import Path

    from medlego.runtime.registry.store import open_store

    data_dir = _data_dir(args)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else data_dir / "cache"
    return open_store(args.store, data_dir, cache, 0)


def _verify(args) -> int:
    from medlego.runtime.registry.audit import PublicKey, verify

    public_key = PublicKey.from_file(args.public_key) if args.public_key else None
    index = _index(args)
    store = _store(args) if public_key is not None else None
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        from medlego.runtime.registry.audit import ensure_schema

        ensure_schema(index)
        lo, hi = index.read("SELECT MIN(seq), MAX(seq) FROM audit")[0]
        bar = tqdm(total=(hi - lo + 1) if lo is not None else 0, unit="rows", unit_scale=True, desc="verify",
                   file=sys.stderr)
    try:
        result = verify(index, public_key=public_key, store=store, grace_s=args.grace,
                        progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if result.ok:
        signed = f"; {result.checkpoints} signed checkpoints match" if public_key is not None else ""
        print(f"audit chain verified: {result.rows} rows{signed}")
        for note in result.notes:
            print(f"note: {note}")
        return 0
    print(f"audit chain BROKEN at row {result.seq}: {result.problem} ({result.rows} rows verified before it)",
          file=sys.stderr)
    return 1


def _export(args) -> int:
    from medlego.runtime.registry.audit import ensure_schema, iter_query
    from medlego.runtime.registry.fhir import write_bundle

    index = _index(args)
    ensure_schema(index)
    rows = iter_query(index, since=args.since, until=args.until, adapter=args.adapter, caller=args.caller)
    out = open(args.output, "w") if args.output else sys.stdout
    n = 0
    try:
        if args.format == "fhir":
            n = write_bundle(rows, out)
        else:
            for row in rows:
                out.write(json.dumps(row, sort_keys=True) + "\n")
                n += 1
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"{n} rows written to {args.output}")
    return 0


def _prune(args) -> int:
    from medlego.runtime.registry.audit import Signer, prune

    signer = Signer.from_file(args.signing_key) if args.signing_key else None
    store = _store(args) if signer is not None else None
    marker = prune(_index(args), args.before, caller="cli", signer=signer, store=store)
    if not marker.get("removed"):
        print("nothing to prune")
        return 0
    print(f"pruned {marker['removed']} rows before {marker['before']}; marker row {marker['seq']} "
          f"anchors the chain at row {marker['kept_from_seq']}" + (" (signed)" if signer is not None else ""))
    return 0


def _keygen(args) -> int:
    from medlego.runtime.registry.audit import generate_keypair

    private, public, key_id = generate_keypair(args.output)
    print(f"wrote {private} (private, mode 0600: [audit] signing_key) and {public} (public: "
          f"medlego audit verify --public-key); key id {key_id}")
    return 0
