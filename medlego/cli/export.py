"""`medlego export`: one task as an ONNX model (adapter folded into the base), checked before writing."""

from __future__ import annotations

import json

from .common import add_adapter_args, add_base_args


def register(sub) -> None:
    p = sub.add_parser("export", help="export base + adapter + one task's head to ONNX (checked with onnxruntime)")
    add_base_args(p)
    add_adapter_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |ONNX - engine| on the check batch")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from medlego.jobs.export import export_onnx

    from .common import load_base_and_adapter

    base, adapter = load_base_and_adapter(args)
    info = export_onnx(base, adapter, args.task, args.output, opset=args.opset, tolerance=args.tolerance)
    print(f"checked with onnxruntime: max abs diff {info['max_abs_diff']:.3g} (tolerance {args.tolerance:g})")
    print(json.dumps(info))
    return 0
