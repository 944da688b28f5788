"""`medlego predict`: diagnose image files with one adapter, from the command line."""

from __future__ import annotations

import json

from .common import add_adapter_args, add_base_args


def register(sub) -> None:
    p = sub.add_parser("predict", help="diagnose PNG/JPEG/DICOM files with an adapter")
    add_base_args(p)
    add_adapter_args(p)
    p.add_argument("--top-k", type=int, default=3, help="labels to print per image, most probable first")
    p.add_argument("--json", action="store_true", help="one JSON object per line and image")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files (the format is read from the content)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from medlego.runtime.imaging import preprocess
    from medlego.runtime.model import AdaptedViT, adapter_logits, probabilities

    from .checks import check_readable
    from .common import load_base_and_adapter

    check_readable(args.images)  # before the base loads: a wrong path costs a second, not a model load
    base, adapter = load_base_and_adapter(args)
    task = adapter.task(args.task)
    if adapter.preprocess.input_size != base.input_size:
        from medlego.runtime.errors import IncompatibleAdapterError

        raise IncompatibleAdapterError(f"adapter expects {adapter.preprocess.input_size}px input, the base takes {base.input_size}px")
    pixels = torch.stack([preprocess(_decode(p), adapter.preprocess) for p in args.images])
    probs = probabilities(adapter_logits(AdaptedViT(base), adapter, pixels, task.name), task)
    for path, p in zip(args.images, probs):
        k = min(args.top_k, task.num_classes)
        vals, idx = torch.topk(p, k)
        top = [(task.labels[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
        if args.json:
            print(json.dumps({"image": path, "task": task.name, "multilabel": task.multilabel,
                              "probabilities": {lab: float(x) for lab, x in zip(task.labels, p.tolist())},
                              "top": [{"label": lab, "probability": v} for lab, v in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{lab} {v:.3f}" for lab, v in top) + f"  [{task.name}]")
    return 0


def _decode(path: str):
    """The decoded image; a refusal names the file, since several may be given."""
    from medlego.runtime.errors import BadImageError
    from medlego.runtime.imaging import load_image_file

    try:
        return load_image_file(path)
    except BadImageError as e:
        raise BadImageError(f"{path}: {e}") from None
