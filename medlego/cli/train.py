"""`medlego train`: fine-tune one SVD-LoRA adapter + head on a local medical dataset."""

from __future__ import annotations

import argparse
import json

from .common import add_base_args


def register(sub) -> None:
    p = sub.add_parser("train", help="train an SVD-LoRA adapter on a dataset (MedMNIST .npz, folder, CSV manifest)",
                       description="Fine-tune one SVD-LoRA adapter (A, E, B on Q and V of every block) and a task head "
                                   "on a frozen base. The defaults are the paper's (r=4, lr 3e-4, 100 epochs).")
    add_base_args(p)
    p.add_argument("--data", required=True, metavar="PATH", help="MedMNIST .npz, image folder, or .csv manifest")
    p.add_argument("--task", required=True, help="task name stored in the adapter: letters, digits, '_' or '-' (e.g. blood)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="adapter file to write (.safetensors)")
    p.add_argument("--labels", help="comma-separated class names (default: class0..; folders/CSV use their own)")
    p.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=4, help="r of every A, E, B")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and folder/CSV splits")
    p.add_argument("--ortho-weight", type=float, default=0.1, help="λ of the orthogonality regulariser")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="learning-rate schedule")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--max-train", type=int, help="use only the first N training images")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    p.add_argument("--init-adapter", metavar="FILE_OR_NAME", help="start from this (merged) adapter's A, E, B")
    p.add_argument("--data-dir", metavar="DIR", help="registry folder for --init-adapter names (default $MEDLEGO_DATA_DIR or ~/.medlego)")
    p.add_argument("--workdir", metavar="DIR", help="checkpoints + metrics log (default: OUTPUT.work/)")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch's checkpoint in --workdir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.add_argument("--stop-after-epoch", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)


def _labels(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",")] if text else None


def _run(args) -> int:
    from pathlib import Path

    from medlego.jobs.datasets import load_dataset
    from medlego.jobs.train import TrainConfig, check_task, train_adapter, write_outputs
    from medlego.runtime.errors import BadInputError
    from medlego.runtime.refs import load_adapter_ref

    from .checks import check_device
    from .common import load_base_from_args

    # every mistake that can be seen without data is found before the base and the data load
    check_task(args.task, _labels(args.labels), multilabel=True)  # the class count is checked against the data
    check_device(args.device)
    if not Path(args.data).expanduser().exists():
        raise BadInputError(f"dataset not found: {args.data}")
    base = load_base_from_args(args)
    data = load_dataset(args.data, input_size=base.input_size, seed=args.seed, label_names=_labels(args.labels))
    init = load_adapter_ref(args.init_adapter, data_dir=args.data_dir, expected_base=base.spec) if args.init_adapter else None
    cfg = TrainConfig(task=args.task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                      seed=args.seed, ortho_weight=args.ortho_weight, weight_decay=args.weight_decay,
                      schedule=args.schedule, warmup_steps=args.warmup, device=args.device, max_train=args.max_train,
                      progress=not args.no_progress, stop_after_epoch=args.stop_after_epoch)
    workdir = Path(args.workdir) if args.workdir else Path(str(args.output) + ".work")
    print(f"dataset {data.name}: {data.sizes()} images, {data.num_classes} {'labels (multi-label)' if data.multilabel else 'classes'}")
    result = train_adapter(base, data, cfg, init=init, workdir=workdir, resume=args.resume)
    sha = write_outputs(result, args.output, workdir)
    print(json.dumps({"adapter": str(args.output), "sha256": sha, "best_epoch": result.best_epoch,
                      "val": {k: result.val[k] for k in ("accuracy", "auc")},
                      "test": {k: result.test[k] for k in ("accuracy", "auc")}}))
    return 0
