"""The command-line edge: the only place where exceptions become exit statuses."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ipcd.config import Config
from ipcd.errors import ExitCode, IpcdError


def run(prog: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Call ``main`` and map what it raises to one stderr line and a documented status."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except IpcdError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (``ipcctl status | head``): not an error.
        sys.stderr.close()
        return int(ExitCode.OK)
    except Exception as exc:  # the CLI's top level: a bug, never "the job failed" (1)
        import traceback

        traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.SOFTWARE)


def control_socket_path(config: Config) -> Path:
    """Where the daemon's control socket is (``[store] socket``): beside the PID file,
    ``ipcd.sock``, until the configuration reads ``[store]``; the one place that says so
    on the command line's side."""
    return config.control_socket


def end_on_sigterm() -> None:
    """Make SIGTERM end a command that runs until stopped (``logs -f``, ``status --watch``)
    the way Ctrl-C does, through its ``KeyboardInterrupt`` path.

    Such a command may have been started with SIGTERM ignored (dispositions set to
    ignore survive exec), and it also has clean-up to do on its way out (close the log,
    leave the terminal tidy), which the default action would skip.  Only these commands
    pay for importing :mod:`signal`; ``submit`` never does.
    """
    import signal

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)


class Parser(argparse.ArgumentParser):
    """argparse with ipcd's conventions: usage errors exit 64 (EX_USAGE), not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: {message}\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument, and a formatter without a
        # width imports shutil (with bz2 and lzma) to ask for the terminal's: 3 ms of a
        # cron job's `ipcctl submit`.  os.get_terminal_size answers the same question.
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 80


class _Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked, so that
    a cron job's ``ipcctl submit`` never imports importlib.metadata."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, *args: object, **kwargs: object
    ) -> NoReturn:
        from importlib import metadata

        try:
            version = metadata.version("ipcd")
        except metadata.PackageNotFoundError:  # run from a checkout that is not installed
            version = "unknown (not installed)"
        print(f"{parser.prog} {version}")  # on stdout, as --help and GNU tools do
        parser.exit(0)


def parser(prog: str, description: str, epilog: str) -> tuple[Parser, Any, Parser]:
    """The top-level parser with -c/--config and --version, its subcommand registry, and
    the parent parser every subcommand takes (``parents=[common]``), so that -c also
    works after the subcommand: ``ipcctl status -c FILE``."""
    top = Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_help = "configuration file (default: $IPCD_CONFIG, /etc/ipcd/ipcd.toml)"
    top.add_argument("-c", "--config", metavar="PATH", help=config_help)
    top.add_argument("--version", action=_Version, help="print the version and exit")
    # SUPPRESS: a subcommand without -c must not overwrite the value given before it.
    common = Parser(add_help=False)
    common.add_argument(
        "-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help
    )
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    return top, sub, common
