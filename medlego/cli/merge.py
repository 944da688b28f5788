"""`medlego merge`: combine adapters without data or training (Med-LEGO and baselines)."""

from __future__ import annotations


def _floats(s: str | None):
    return None if s is None else [float(x) for x in s.split(",")]


def register(sub) -> None:
    from medlego.runtime.merging import METHODS

    p = sub.add_parser("merge", help="merge adapters into one that carries every source task (no data, no training)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="adapter files or registered NAME[@VERSION]")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--method", default="med-lego", choices=METHODS)
    p.add_argument("--data-dir", metavar="DIR", help="registry folder for registered names")
    p.add_argument("--task-names", help="comma-separated new names for all source tasks, in order")
    g = p.add_argument_group("method parameters")
    g.add_argument("--threshold", type=float, help="med-lego: keep singular values up to this share of their sum (default 0.997)")
    g.add_argument("--max-rank", type=int, help="cap the merged rank per matrix (all methods)")
    g.add_argument("--weights", help="per-source weights, comma-separated (med-lego, lora-avg, delta-avg, ties, dare, pem)")
    g.add_argument("--scale", type=float, help="λ for task-arithmetic (default 0.3) and ties (default 1.0)")
    g.add_argument("--density", type=float, help="ties / magnitude-prune: share of entries kept (default 0.2)")
    g.add_argument("--drop", type=float, help="dare: drop probability p (default 0.5)")
    g.add_argument("--seed", type=int, help="dare: random seed (default 0)")
    g.add_argument("--signs", help="pem: +/- per source, e.g. +,+,- to negate the third")
    g.add_argument("--alpha", type=float, help="iso-c / tsv: scale (default 1.0)")
    g.add_argument("--keep", type=float, help="tsv: share of each task's singular directions kept (default 1/N)")
    p.add_argument("--no-report", action="store_true", help="skip OUTPUT.report.json/.png")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from medlego.jobs.merge import write_report
    from medlego.runtime.adapter_merge import merge_adapters
    from medlego.runtime.adapter import save_adapter
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
    adapter, report = merge_adapters([a for a, _ in loaded], args.method, params, source_info=[s for _, s in loaded],
                                     task_names=args.task_names.split(",") if args.task_names else None)
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
