"""`medlego … --help` explains every flag and shows its default; `medlego --version`."""

from __future__ import annotations

import argparse

import pytest

import medlego
from medlego.cli import build_parser, main

# Flags of subcommands whose modules others are changing right now; each is to get its help there.
NOT_YET = {("medlego merge", "-o"), ("medlego merge", "--method"), ("medlego bench", "--device"),
           ("medlego bench", "--repeats"), ("medlego bench", "--no-progress")}


def _parsers(parser: argparse.ArgumentParser, path: str = "medlego"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_flag_and_argument_has_help():
    missing = [(path, (a.option_strings or [a.dest])[0]) for path, p in _parsers(build_parser()) for a in p._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert set(missing) <= NOT_YET, sorted(set(missing) - NOT_YET)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps at the terminal width


def test_defaults_are_shown(capsys):
    text = _help(capsys, "train")
    assert "passes over the training split (default: 100)" in text and "AdamW learning rate (default: 0.0003)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # nothing to show: nothing shown


def test_a_token_in_the_environment_is_never_shown(capsys, monkeypatch):
    monkeypatch.setenv("MEDLEGO_API_TOKEN", "secret-api-token")
    monkeypatch.setenv("MEDLEGO_ADMIN_TOKEN", "secret-admin-token")
    assert "secret" not in _help(capsys, "client", "diagnose") + _help(capsys, "client", "register")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"medlego {medlego.__version__}\n"
