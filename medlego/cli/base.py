"""`medlego base init|fingerprint|info`: make and identify base weights files."""

from __future__ import annotations

import json

from .common import add_base_args, load_base_from_args


def register(sub) -> None:
    p = sub.add_parser("base", help="make a base weights file, print its fingerprint")
    s = p.add_subparsers(dest="base_command", metavar="ACTION", required=True)

    init = s.add_parser("init", help="write a reproducible random-init base (timm state_dict, safetensors)")
    init.add_argument("--model", required=True, metavar="NAME", help="timm ViT/DeiT name")
    init.add_argument("--seed", type=int, default=0, help="random seed of the weights (same seed, same file)")
    init.add_argument("--img-size", type=int, default=None,
                      help="input size (default: the model's own); small sizes make fast test/demo bases")
    init.add_argument("-o", "--output", required=True, metavar="FILE", help="weights file to write (.safetensors)")
    init.set_defaults(func=_init)

    fp = s.add_parser("fingerprint", help="print the base's fingerprint (one hex string)")
    add_base_args(fp)
    fp.set_defaults(func=_fingerprint)

    info = s.add_parser("info", help="print the base's name, fingerprint, sizes and preprocessing as JSON")
    add_base_args(info)
    info.set_defaults(func=_info)


def _init(args) -> int:
    from medlego.runtime.base import init_weights_file, load_base

    path = init_weights_file(args.model, args.seed, args.output, img_size=args.img_size)
    base = load_base(args.model, path)
    print(f"wrote {path} ({args.model}, seed {args.seed}, input {base.input_size}px, fingerprint {base.fingerprint})")
    return 0


def _fingerprint(args) -> int:
    print(load_base_from_args(args).fingerprint)
    return 0


def _info(args) -> int:
    b = load_base_from_args(args)
    print(json.dumps({"model": b.name, "fingerprint": b.fingerprint, "embed_dim": b.embed_dim, "depth": b.depth,
                      "input_size": b.input_size, "params": b.num_params, "preprocess": b.preprocess.to_json()}))
    return 0
