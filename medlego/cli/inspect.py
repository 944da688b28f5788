"""`medlego inspect ADAPTER`: tasks, ranks, parameter count and share of the base, size, provenance."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="describe an adapter file or registered adapter")
    p.add_argument("adapter", help="adapter file or registered NAME[@VERSION]")
    p.add_argument("--data-dir", metavar="DIR", help="registry folder for registered names "
                                                     "(default $MEDLEGO_DATA_DIR or ~/.medlego)")
    p.add_argument("--json", action="store_true", help="everything as one JSON object")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from medlego.runtime.summary import summarize
    from medlego.runtime.refs import load_adapter_ref

    adapter, src = load_adapter_ref(args.adapter, data_dir=args.data_dir)
    s = summarize(adapter, src["path"], src["sha256"])
    if args.json:
        print(json.dumps(s))
        return 0
    lora_a_b = s["lora_params"] - s["lora_params_E"]
    print(f"adapter      {s['path']}  ({s['file_bytes']:,} bytes, sha256 {s['sha256']})")
    print(f"base         {s['base']['model']}  fingerprint {s['base']['fingerprint']}")
    for t in s["tasks"]:
        kind = "multi-label" if t["multilabel"] else "single-label"
        print(f"task         {t['name']}: {len(t['labels'])} labels, {kind} ({', '.join(t['labels'][:8])}{' …' if len(t['labels']) > 8 else ''})")
    hist = ", ".join(f"r={r}: {n}" for r, n in s["ranks"]["histogram"].items())
    print(f"ranks        {hist}  (Q and V of {s['base']['depth']} blocks)")
    print(f"parameters   LoRA {s['lora_params']:,} = {lora_a_b:,} (A, B) + {s['lora_params_E']:,} (E); "
          f"heads {s['head_params']:,}")
    print(f"share        {100 * s['lora_share_of_base']:.3f}% of the base's {s['base_params']:,} parameters")
    print(f"preprocess   {json.dumps(s['preprocess'])}")
    print(f"created      {s['created']}")
    print(f"provenance   {json.dumps(s['provenance'])[:2000]}")
    return 0
