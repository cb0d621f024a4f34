"""The README documents the tool as it is: every flag of ``run`` and ``rules``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trio_tproxy.cli import build_parser

README = (Path(__file__).parent.parent / "README.md").read_text()


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        {
            option
            for action in parser._actions
            for option in action.option_strings
            if option.startswith("--") and option != "--help"
        }
    )


@pytest.mark.parametrize("command", ["run", "rules"])
def test_every_flag_is_in_the_readme(command: str) -> None:
    missing = [flag for flag in _long_flags(_subparser(command)) if f"`{flag}" not in README]
    assert not missing, f"README does not document `trio-tproxy {command}` flags {missing}"
