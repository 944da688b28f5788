"""The `medlego` command. Each subcommand lives in its own module here and exposes
``register(subparsers)``; this file only assembles them and maps expected errors to one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from medlego.runtime.errors import MedlegoError

# Order is the order of `medlego --help`.
COMMAND_MODULES = ("base", "inspect", "convert", "predict", "train", "eval", "merge", "registry",
                   "serve", "bench", "export", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medlego",
        description="Medical image diagnosis with one frozen ViT and hot-swapped SVD-LoRA adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"medlego.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"medlego.cli.{name}":  # a subcommand not built yet in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedlegoError as e:
        print(f"medlego {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medlego {args.command}: interrupted", file=sys.stderr)
        return 130
