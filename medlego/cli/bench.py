"""`medlego bench`: throughput, latency, load times, memory, scale and merge time on this machine."""

from __future__ import annotations


def register(sub) -> None:
    from medlego.benchmarks.bench import add_args

    p = sub.add_parser("bench", help="benchmark the engine against PEFT and switch-per-request on this machine")
    add_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from medlego.benchmarks.bench import run_from_args

    return run_from_args(args)
