"""`medlego convert`: plain LoRA (PEFT LoRA/AdaLoRA, MeLo/LoRA-ViT) → an exact SVD-LoRA adapter."""

from __future__ import annotations

from .common import add_base_args


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a PEFT LoRA/AdaLoRA or MeLo/LoRA-ViT adapter to SVD-LoRA (exact)")
    p.add_argument("source", help="a PEFT adapter folder, or a LoRA-ViT .safetensors file")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="adapter file to write (.safetensors)")
    p.add_argument("--format", choices=["auto", "peft", "lora-vit"], default="auto",
                   help="the source's layout (auto: a folder is PEFT, a file LoRA-ViT)")
    p.add_argument("--task", required=True, help="task name stored in the adapter")
    p.add_argument("--labels", help="comma-separated class labels")
    p.add_argument("--num-classes", type=int, help="instead of --labels: class0..classN-1")
    p.add_argument("--multilabel", action="store_true", help="per-label sigmoid instead of softmax")
    p.add_argument("--head", metavar="FILE", help="safetensors with the head's 'weight' [classes, d] and 'bias'")
    p.add_argument("--drop-k", action="store_true",
                   help="PEFT on qkv: keep Q/V and drop a non-zero K update (reported), instead of refusing")
    p.add_argument("--rank", type=int, help="LoRA-ViT: rank if not in the file name")
    p.add_argument("--alpha", type=int, help="LoRA-ViT: alpha if not in the file name (scale = alpha // rank)")
    add_base_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pathlib import Path

    from medlego.runtime.adapter import save_adapter
    from medlego.runtime.convert import convert_lora_vit, convert_peft, make_task, read_head_file

    from .common import load_base_from_args

    base = load_base_from_args(args)
    task = make_task(args.task, args.labels.split(",") if args.labels else None, args.num_classes, args.multilabel)
    src = Path(args.source)
    fmt = args.format if args.format != "auto" else ("peft" if src.is_dir() else "lora-vit")
    head = read_head_file(args.head) if args.head else None
    if fmt == "peft":
        adapter, report = convert_peft(src, base, task, head=head, drop_k=args.drop_k)
    else:
        adapter, report = convert_lora_vit(src, base, task, rank=args.rank, alpha=args.alpha)
        if head is not None:
            from dataclasses import replace

            adapter = replace(adapter, heads={task.name: head})
    sha = save_adapter(adapter, args.output)
    print(f"converted {report.kind} {src} -> {args.output} ({report.matrices} matrices, sha256 {sha[:16]})")
    for d in report.dropped:
        print(f"dropped: {d}")
    for n in report.notes:
        print(f"note: {n}")
    return 0
