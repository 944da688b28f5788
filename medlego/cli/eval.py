"""`medlego eval`: accuracy and AUC of any adapter (trained or merged) on a dataset split."""

from __future__ import annotations

import json

from .common import add_adapter_args, add_base_args


def register(sub) -> None:
    p = sub.add_parser("eval", help="metrics of an adapter on a dataset split")
    add_base_args(p)
    add_adapter_args(p)
    p.add_argument("--data", required=True, metavar="PATH", help="MedMNIST .npz, image folder, or .csv manifest")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to measure on")
    p.add_argument("--seed", type=int, default=0, help="split seed for folders/manifests without splits")
    p.add_argument("--json", action="store_true", help="the metrics as one JSON object")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from medlego.jobs.evaluate import evaluate_on

    from .common import load_base_and_adapter

    base, adapter = load_base_and_adapter(args)
    m = evaluate_on(base, adapter, args.data, args.task, args.split, seed=args.seed)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{m['task']} on {m['dataset']}/{args.split} ({m['n']} images): accuracy {m['accuracy']:.4f}, AUC {m['auc']:.4f}")
    return 0
