"""`medlego … --help` explains every flag and shows its default; `medlego --version`."""

from __future__ import annotations

import argparse

import pytest

import medlego
from medlego.cli import build_parser, main



def _parsers(parser: argparse.ArgumentParser, path: str = "medlego"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_flag_and_argument_has_help():
    missing = [(path, (a.option_strings or [a.dest])[0]) for path, p in _parsers(build_parser()) for a in p._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, sorted(missing)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps at the terminal width


def test_defaults_are_shown(capsys):
    text = _help(capsys, "train")
    assert "passes over the training split (default: 100)" in text and "AdamW learning rate (default: 0.0003)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # nothing to show: nothing shown


# value flags whose value has no default by nature (a file, a name, an address the user names)
NAMED_BY_THE_USER = {"--model", "--weights", "--http", "--http-adapter", "--config"}


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_every_setting_of_a_long_running_command_states_its_default(command):
    """A flag left out takes a value from somewhere (the config's defaults, the machine): --help says which."""
    parser = dict(_parsers(build_parser()))[f"medlego {command}"]
    silent = [a.option_strings[0] for a in parser._actions
              if a.option_strings and a.nargs != 0 and a.default is None and not a.required
              and a.option_strings[0] not in NAMED_BY_THE_USER and "default" not in (a.help or "").lower()]
    assert not silent, silent


def test_a_token_in_the_environment_is_never_shown(capsys, monkeypatch):
    monkeypatch.setenv("MEDLEGO_API_TOKEN", "secret-api-token")
    monkeypatch.setenv("MEDLEGO_ADMIN_TOKEN", "secret-admin-token")
    assert "secret" not in _help(capsys, "client", "diagnose") + _help(capsys, "client", "register")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"medlego {medlego.__version__}\n"


def test_client_token_variables_are_the_servers():
    from medlego.cli import client
    from medlego.runtime import config

    assert (client.API_TOKEN_ENV, client.ADMIN_TOKEN_ENV) == (config.API_TOKEN_ENV, config.ADMIN_TOKEN_ENV)


def test_one_subcommand_parses_alone():
    """`medlego NAME …` builds only NAME's parser, and its usage is the same as in the whole command's."""
    whole = dict((path, p.format_usage()) for path, p in _parsers(build_parser()))
    for path, p in _parsers(build_parser("client")):
        assert path == "medlego" or whole[path] == p.format_usage(), path


def test_every_subcommand_is_in_the_readmes_commands_table():
    import re
    from pathlib import Path

    from medlego.cli import COMMAND_MODULES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("\n## Commands\n"):]
    table = table[:table.index("\n## ", 1)]
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `medlego ")]
    for name in COMMAND_MODULES:
        assert any(row.startswith(f"| `medlego {name}") for row in rows), name
    for path, p in _parsers(build_parser()):  # every action of registry and client is named in its row
        parts = path.split()
        if len(parts) == 3 and parts[1] in ("registry", "client"):
            row = next(r for r in rows if r.startswith(f"| `medlego {parts[1]}"))
            assert re.search(rf"[ |]{re.escape(parts[2])}(\\\||[ `])", row), path
