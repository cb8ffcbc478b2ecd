"""What the argparse parsers of ``ipcd`` and ``ipcctl`` offer, for the tests that check
the man pages and the shell completion against them (so that neither drifts)."""

from __future__ import annotations

import argparse

from ipcd.cli import ipcctl_args, ipcd

PARSERS: dict[str, argparse.ArgumentParser] = {
    "ipcctl": ipcctl_args.build_parser(),
    "ipcd": ipcd.build_parser(),
}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands by name, found by walking the parser's subparsers actions."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def options(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of a parser (``-c`` and ``--config`` alike), but its own -h."""
    return [
        option
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    ]


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for option in options(parser) if option.startswith("--")]
