"""`medlego merge`: combine adapters without training (Med-LEGO and baselines), optionally tuned on validation data."""

from __future__ import annotations


def _floats(s: str | None):
    return None if s is None else [float(x) for x in s.split(",")]


def register(sub) -> None:
    from medlego.runtime.adapter_merge import METHODS

    p = sub.add_parser("merge", help="merge adapters into one that carries every source task (no training)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="adapter files or registered NAME[@VERSION]")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="merged adapter file to write (.safetensors)")
    p.add_argument("--method", default="med-lego", choices=METHODS, help="merge method (see README, Merging)")
    p.add_argument("--data-dir", metavar="DIR", help="registry folder for registered names (default $MEDLEGO_DATA_DIR or ~/.medlego)")
    p.add_argument("--task-names", help="comma-separated new names for all source tasks, in order")
    g = p.add_argument_group("method parameters")
    g.add_argument("--threshold", type=float, help="med-lego: keep singular values up to this share of their sum (default 0.997)")
    g.add_argument("--max-rank", type=int, help="cap the merged rank per matrix (all methods)")
    g.add_argument("--weights", help="per-source weights w_i, comma-separated: the merge is Σ w_i·ΔW_i (they replace "
                                     "1/N of med-lego, delta-avg, lora-avg, pem, and 1 of ties, dare, magnitude-prune); "
                                     "weights summing to 1 give a weighted mean")
    g.add_argument("--scale", type=float, help="λ: task-arithmetic (default 0.3); ties, dare, magnitude-prune and their "
                                               "core- variants (default 1.0)")
    g.add_argument("--density", type=float, help="ties / magnitude-prune (and core-): share of entries kept (default 0.2)")
    g.add_argument("--drop", type=float, help="dare / core-dare: drop probability p (default 0.5)")
    g.add_argument("--seed", type=int, help="dare / core-dare: one seed for the whole merge (default 0)")
    g.add_argument("--signs", help="pem: +/- per source, e.g. +,+,- to negate the third")
    g.add_argument("--alpha", type=float, help="iso-c: α × (Σσ / min(d_out, d_in)), the official scale; "
                                               "tsv: α × the merged spectrum (default 1.0)")
    g.add_argument("--keep", type=float, help="tsv: share of each task's singular directions kept, at most "
                                              "min(d_out, d_in)/N (default 1.0, the official rule)")
    t = p.add_argument_group("tuning on validation data (needs the base; --weights is taken by the sources' weights)")
    t.add_argument("--tune-on", nargs="+", metavar="TASK=FILE",
                   help="choose α / λ / density / drop / threshold on these tasks' validation splits (MedMNIST .npz, "
                        "image folder or CSV): the best mean normalised metric (merged ÷ its source) over the method's "
                        "grid; parameters given above stay fixed; grid and choice go into the provenance")
    t.add_argument("--model", metavar="NAME", help="the sources' base: timm ViT/DeiT name")
    t.add_argument("--base-weights", metavar="FILE", help="the base's local weights file (as --weights elsewhere)")
    t.add_argument("--pretrained", action="store_true", help="let timm download the base's weights instead")
    p.add_argument("--no-report", action="store_true", help="skip OUTPUT.report.json/.png")
    p.set_defaults(func=_run)


def _tuning_sets(args, adapter_tasks: list[str]):
    """{task: validation Dataset} from --tune-on TASK=FILE, and the base to evaluate on."""
    from medlego.jobs.datasets import load_dataset
    from medlego.runtime.base import load_base
    from medlego.runtime.errors import BadInputError

    if not args.model:
        raise BadInputError("--tune-on evaluates merges: pass the base with --model NAME --base-weights FILE")
    base = load_base(args.model, args.base_weights, pretrained=args.pretrained)
    sets = {}
    for item in args.tune_on:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise BadInputError(f"--tune-on takes TASK=FILE, got {item!r}")
        if task not in adapter_tasks:
            raise BadInputError(f"--tune-on task '{task}' is not a task of the sources ({', '.join(adapter_tasks)})")
        sets[task] = load_dataset(path, input_size=base.input_size)
    return base, sets


def _run(args) -> int:
    from medlego.jobs.merge import tune, write_report
    from medlego.runtime.adapter import save_adapter
    from medlego.runtime.adapter_merge import merge_adapters, merged_tasks
    from medlego.runtime.errors import BadInputError
    from medlego.runtime.refs import load_adapter_ref

    loaded = [load_adapter_ref(s, data_dir=args.data_dir) for s in args.sources]
    signs = None
    if args.signs:
        try:
            signs = [{"+": 1, "-": -1}[x.strip()] for x in args.signs.split(",")]
        except KeyError:
            raise BadInputError("--signs takes + or - per source, e.g. +,+,-") from None
    params = {"threshold": args.threshold, "max_rank": args.max_rank, "weights": _floats(args.weights),
              "scale": args.scale, "density": args.density, "drop": args.drop, "seed": args.seed, "signs": signs,
              "alpha": args.alpha, "keep": args.keep}
    params = {k: v for k, v in params.items() if v is not None}
    sources, info = [a for a, _ in loaded], [s for _, s in loaded]
    task_names = args.task_names.split(",") if args.task_names else None
    tuning = None
    if args.tune_on:
        tasks, _ = merged_tasks(sources, [s.get("ref") or f"source{i}" for i, s in enumerate(info)], task_names)
        base, sets = _tuning_sets(args, [t.name for t in tasks])
        params, tuning = tune(base, sources, args.method, sets, params, task_names=task_names,
                              files={item.partition("=")[0]: item.partition("=")[2] for item in args.tune_on},
                              log=print)
    adapter, report = merge_adapters(sources, args.method, params, source_info=info, task_names=task_names,
                                     tuning=tuning)
    sha = save_adapter(adapter, args.output)
    ranks = [m["rank"] for m in report["matrices"].values()]
    share = min(m["kept_share"] for m in report["matrices"].values())
    print(f"merged {len(loaded)} adapters with {args.method} -> {args.output} (sha256 {sha[:16]}); tasks: "
          f"{', '.join(adapter.task_names)}; rank per matrix {min(ranks)}..{max(ranks)}, "
          f"min kept share {share:.4f}; {report['seconds'] * 1000:.1f} ms")
    if not args.no_report:
        js, png = write_report(report, args.output)
        print(f"report: {js}" + (f", {png}" if png else ""))
    return 0
