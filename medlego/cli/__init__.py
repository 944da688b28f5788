"""The `medlego` command. Each subcommand lives in its own module here and exposes
``register(subparsers)``; this file only assembles them and maps expected errors to one line."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from medlego import __version__
from medlego.runtime.errors import MedlegoError

# Order is the order of `medlego --help`.
COMMAND_MODULES = ("base", "inspect", "convert", "predict", "train", "eval", "merge", "registry",
                   "audit", "token", "serve", "client", "dicom", "samples", "bench", "export", "demo", "dev-fleet")
DEBUG_ENV = "MEDLEGO_DEBUG"  # set to 1: expected errors show their traceback too

# File-system mistakes (a wrong path, a file without read permission) are a user's, not a bug:
# they get the one line too. OSErrors without a file name (a socket, the disk) stay tracebacks.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default after its help, unless there is nothing to show (None, off) or the
    help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every parser of the command (subcommands inherit the class): defaults in --help, and an
    unknown flag answered with the subcommand's own usage and the closest flag it has."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def unknown_arguments(self, extra: list[str]) -> None:
        flags = [s for a in self._actions for s in a.option_strings]
        hints = [f"{x} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(x.split("=")[0], flags, 1))
                 else x for x in extra]
        self.error("unrecognized arguments: " + " ".join(hints))


def build_parser(only: str | None = None) -> Parser:
    """The whole command, or (``only``) just that subcommand: what `medlego NAME …` parses, without
    importing the other subcommands' modules (`medlego client` then starts without torch)."""
    parser = Parser(
        prog="medlego",
        description="Medical image diagnosis with one frozen ViT and hot-swapped SVD-LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"medlego {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (only,) if only in COMMAND_MODULES else COMMAND_MODULES:
        module_name = f"medlego.cli.{name.replace('-', '_')}"  # `medlego dev-fleet` lives in dev_fleet.py
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # a subcommand not built yet in this checkout
                continue
            raise
        module.register(sub)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as the default `_parser` of what it parses; argparse applies the
    innermost subparser's defaults last, so `args._parser` is the one that was chosen. A command's own
    flags are also accepted after its action (`medlego audit verify --data-dir DIR` as well as
    `medlego audit --data-dir DIR verify`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(_parser=child)
                _share_flags(parser, child)
                _remember_parsers(child)


def _share_flags(parent: argparse.ArgumentParser, child: argparse.ArgumentParser) -> None:
    """Copy the parent's optional flags onto the child parser with a SUPPRESS default: given after the
    action they override, absent they leave what was given before the action (or the parent's default)."""
    taken = {s for a in child._actions for s in a.option_strings}
    for group in parent._action_groups:
        flags = [a for a in group._group_actions if a.option_strings and not isinstance(a, (
            argparse._HelpAction, argparse._VersionAction)) and not taken & set(a.option_strings)]
        if not flags:
            continue
        target = child.add_argument_group(group.title) if group.title not in ("options", "optional arguments") else child
        for a in flags:
            kwargs = {"dest": a.dest, "help": a.help, "default": argparse.SUPPRESS}
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kwargs["action"] = "store_true" if isinstance(a, argparse._StoreTrueAction) else "store_false"
            else:
                kwargs.update(metavar=a.metavar, type=a.type, choices=a.choices, nargs=a.nargs)
                if isinstance(a, argparse._AppendAction):
                    kwargs["action"] = "append"
            target.add_argument(*a.option_strings, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)  # a known subcommand first: only its module is loaded
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).unknown_arguments(extra)
    try:
        return int(args.func(args) or 0)
    except (MedlegoError, *_FILE_ERRORS) as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or (isinstance(e, OSError) and e.filename is None):
            raise
        message = f"{e.filename}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        # one line, whatever a wrapped library message held
        print(f"medlego {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medlego {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `medlego … | head`: the reader left; exit as Unix tools do, without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141
