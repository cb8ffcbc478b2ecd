"""The command-line edge: the only place where exceptions become exit statuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

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


class Parser(argparse.ArgumentParser):
    """argparse with ipcd's conventions: usage errors exit 64 (EX_USAGE), not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: {message}\n")


def parser(prog: str, description: str, epilog: str) -> tuple[Parser, Any]:
    """The top-level parser with -c/--config, and its subcommand registry."""
    top = Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "-c", "--config", help="configuration file (default: $IPCD_CONFIG, /etc/ipcd/ipcd.toml)"
    )
    return top, top.add_subparsers(dest="command", required=True, parser_class=Parser)
